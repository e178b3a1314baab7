// A Soma runtime written in Node: the handshake, then `system.echo` through Stimulate and
// through the Stream RPC, each answer printed as one JSON line. See the README, "Other
// languages"; the protocol is described in sdk/protocol/__init__.py.
//
//   node client.mjs [unix:///path/to/sidecar.sock]
//
// Under `soma supervise` (a [[runtime]] with command = ["node", ".../client.mjs"]) it takes
// everything from its environment: SOMA_SIDECAR_ADDRESS, SOMA_AUTH_SOCKET and the token from
// the descriptor SOMA_TOKEN_FD. Against a standalone `soma sidecar` give the socket's address:
// the token is read from `<name>.token` beside the socket (or the file SOMA_TOKEN_FILE names).
import fs from "node:fs";
import net from "node:net";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const PROTO = fileURLToPath(new URL("../../proto/soma/v1/sidecar.proto", import.meta.url));
const MAX_LINE = 4096; // the longest handshake line the sidecar writes or reads
const RETRY_PAUSE_MS = 20; // between handshake attempts while the sidecar (re)starts
const DEADLINE_MS = 10_000;

class Final extends Error {} // a refusal that asking again will not change

function socketPath(target) {
  for (const prefix of ["unix://", "unix:"]) {
    if (target.startsWith(prefix)) return target.slice(prefix.length);
  }
  throw new Final(`not a unix: target: ${target}`);
}

function companion(path, suffix) {
  return (path.endsWith(".sock") ? path.slice(0, -".sock".length) : path) + suffix;
}

function readToken(path) {
  const fd = process.env.SOMA_TOKEN_FD;
  if (fd) {
    // The supervisor wrote the token into this descriptor, so its offset is at the end: a
    // plain read returns nothing. Read at position 0 (pread), then close it, so that
    // programs this runtime starts do not inherit it (Node cannot set close-on-exec).
    const buffer = Buffer.alloc(MAX_LINE);
    const n = fs.readSync(Number(fd), buffer, 0, MAX_LINE, 0);
    fs.closeSync(Number(fd));
    return buffer.subarray(0, n).toString().trim();
  }
  return fs.readFileSync(process.env.SOMA_TOKEN_FILE ?? companion(path, ".token"), "utf8").trim();
}

// One attempt: the answer object, or null when the sidecar is not (yet) there to answer.
function askOnce(authSocket, token) {
  return new Promise((resolve, reject) => {
    const sock = net.createConnection({ path: authSocket });
    let received = "";
    let settled = false;
    const settle = (fn, value) => {
      if (!settled) {
        settled = true;
        sock.destroy();
        fn(value);
      }
    };
    sock.setTimeout(5000, () => settle(resolve, null));
    sock.on("connect", () => sock.write(JSON.stringify({ token }) + "\n"));
    sock.on("data", (chunk) => {
      received += chunk.toString();
      const end = received.indexOf("\n");
      if (end >= 0) {
        try {
          settle(resolve, JSON.parse(received.slice(0, end)));
        } catch {
          settle(reject, new Final("the handshake answer is not JSON"));
        }
      } else if (received.length > MAX_LINE) {
        settle(reject, new Final("the handshake answer is too long"));
      }
    });
    // No socket yet, nobody listening, or closed without an answer: the sidecar is
    // (re)starting. A refusal may be written before our request: its line is read first.
    sock.on("error", () => settle(resolve, null));
    sock.on("close", () => settle(resolve, null));
  });
}

// The session for the channel, asking again while the answer is "retry" or none.
async function handshake(authSocket, token) {
  const deadline = Date.now() + DEADLINE_MS;
  for (;;) {
    const answer = await askOnce(authSocket, token);
    if (answer?.ok === true && typeof answer.session === "string") return answer.session;
    if (answer !== null && answer.error !== "retry") {
      // "unauthenticated", "refused", "bad_request", "internal": final.
      throw new Final(`handshake refused (${answer.error}): ${answer.message ?? ""}`);
    }
    if (Date.now() + RETRY_PAUSE_MS >= deadline) {
      throw new Error(`no session from ${authSocket} within ${DEADLINE_MS} ms`);
    }
    await new Promise((resume) => setTimeout(resume, RETRY_PAUSE_MS));
  }
}

function decode(reply) {
  return {
    ok: reply.ok,
    output: JSON.parse(reply.output_json.toString()),
    latency_ms: reply.latency_ms,
  };
}

function stimulate(client, metadata, op, input) {
  return new Promise((resolve, reject) => {
    const request = { op, input_json: Buffer.from(JSON.stringify(input)), context: {} };
    client.Stimulate(request, metadata, { deadline: Date.now() + 10_000 }, (error, reply) =>
      error ? reject(error) : resolve(decode(reply)),
    );
  });
}

// One call on a Stream: sent only once the sidecar has accepted the stream (initial metadata
// `soma-stream-accepted`), so that a refused stream ran nothing and may be opened again.
function streamOnce(client, metadata, op, input) {
  return new Promise((resolve, reject) => {
    const call = client.Stream(metadata, { deadline: Date.now() + 10_000 });
    let answered = false;
    call.on("metadata", (initial) => {
      if (initial.get("soma-stream-accepted").length === 0) return;
      const request = { op, input_json: Buffer.from(JSON.stringify(input)), context: {} };
      call.write({ id: 1, call: request, timeout_s: 10 });
    });
    call.on("data", (answer) => {
      answered = true;
      call.end(); // every call answered: close our side, the sidecar ends the stream
      if (answer.result === "reply") resolve(decode(answer.reply));
      else reject(new Error(`${answer.error.code}: ${answer.error.message}`));
    });
    call.on("error", (error) => {
      if (!answered) reject(error);
    });
  });
}

async function main() {
  const target = process.argv[2] ?? process.env.SOMA_SIDECAR_ADDRESS;
  if (!target) throw new Final("give the sidecar's address, or run under `soma supervise`");
  const path = socketPath(target);
  const session = await handshake(
    process.env.SOMA_AUTH_SOCKET ?? companion(path, ".auth.sock"),
    readToken(path),
  );
  const metadata = new grpc.Metadata();
  metadata.add("authorization", `Bearer ${session}`);

  const definition = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, oneofs: true });
  const { Sidecar } = grpc.loadPackageDefinition(definition).soma.v1;
  const client = new Sidecar(`unix://${path}`, grpc.credentials.createInsecure());
  try {
    const unary = await stimulate(client, metadata, "system.echo", { from: "node", via: "Stimulate" });
    console.log(JSON.stringify({ rpc: "Stimulate", ...unary }));
    const streamed = await streamOnce(client, metadata, "system.echo", { from: "node", via: "Stream" });
    console.log(JSON.stringify({ rpc: "Stream", ...streamed }));
  } finally {
    client.close();
  }
}

try {
  await main();
} catch (error) {
  console.error(`node client: ${error.message}`);
  process.exit(error instanceof Final ? 2 : 1);
}
