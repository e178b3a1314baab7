"""Example agent runtimes that `make run` supervises."""
