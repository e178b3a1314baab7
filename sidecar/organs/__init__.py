"""Built-in organs, by the short names a configuration may use."""

BUILTIN_ORGANS: dict[str, str] = {
    "system": "sidecar.organs.system:SystemOrgan",
    "vault": "sidecar.organs.vault:VaultOrgan",
    "http": "sidecar.organs.http:HttpOrgan",
}
