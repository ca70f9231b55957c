// Trains a small network on a layerd server from Node.js: @grpc/grpc-js with the service loaded
// from proto/layerd/v1/layerd.proto at run time by @grpc/proto-loader (no generated code).
//
// The data set is generated here: three Gaussian blobs in the plane, 300 points, class ids as
// int64. The network lives on the server: affine 2→16, relu, affine 16→3, softmax_with_loss,
// float32, trained by the server's Adam with one TrainStep per step. The script prints the loss
// and exits 1 unless it falls below TARGET_LOSS.
//
// Each TrainStep carries its number (`expected_step`), so it is applied exactly once however
// often it is sent: the loop retries UNAVAILABLE (a replica restarting or lost, a session moving
// between replicas of a --session-store deployment) with backoff, and a retry of a step the
// server already applied gets that step's answer again. Behind a load balancer in front of
// replicas sharing a session store, training so survives the death of the replica it was on.
//
//   cd examples/node && npm ci
//   node train.js [--addr 127.0.0.1:50051] [--steps 300] [--every 50]
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// The blobs overlap (no network gets the loss to 0): about 0.15 after 300 steps.
const TARGET_LOSS = 0.25;

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at > 0 ? process.argv[at + 1] : fallback;
}

// Tensors: row-major, little-endian, packed.
function float32Tensor(values, shape) {
  const data = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => data.writeFloatLE(v, i * 4));
  return { dtype: 'DTYPE_FLOAT32', shape, data };
}

function int64Tensor(values) {
  const data = Buffer.alloc(values.length * 8);
  values.forEach((v, i) => data.writeBigInt64LE(BigInt(v), i * 8));
  return { dtype: 'DTYPE_INT64', shape: [values.length], data };
}

function fromFloat32(tensor) {
  const out = [];
  for (let i = 0; i < tensor.data.length; i += 4) out.push(tensor.data.readFloatLE(i));
  return out;
}

// A seeded generator (mulberry32) and Box-Muller normals: the same data on every run.
function generator(seed) {
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const normal = () => Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform());
  return { uniform, normal };
}

function blobs(n, rng) {
  const centres = [[-2, 0], [2, 0], [0, 2.5]];
  const x = [];
  const t = [];
  for (let i = 0; i < n; i++) {
    const c = i % centres.length;
    x.push(centres[c][0] + 1.0 * rng.normal(), centres[c][1] + 1.0 * rng.normal());
    t.push(c);
  }
  return { x, t };
}

// Unary calls retried on UNAVAILABLE, waiting between half and all of 0.2 s, 0.4 s, ... (at most
// 5 s) each time: safe for every call here (a numbered TrainStep included, see above) but
// CreateSession, whose retry may find the session created (ALREADY_EXISTS: then it was).
async function retried(call, method, request, attempts = 10) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await call(method, request);
    } catch (error) {
      if (error.code !== grpc.status.UNAVAILABLE || attempt >= attempts) throw error;
      const ceiling = Math.min(5000, 200 * 2 ** (attempt - 1));
      await new Promise((resolve) => setTimeout(resolve, ceiling * (0.5 + Math.random() / 2)));
    }
  }
}

// Promisified unary calls that carry the session id for a session-routing load balancer.
function caller(client, sessionId) {
  const metadata = new grpc.Metadata();
  metadata.set('x-session-id', sessionId);
  return (method, request) => new Promise((resolve, reject) => {
    client[method](request, metadata, (error, answer) => (error ? reject(error) : resolve(answer)));
  });
}

async function main() {
  const addr = option('addr', '127.0.0.1:50051');
  const steps = Number(option('steps', '300'));
  const every = Number(option('every', '50'));
  const proto = path.join(__dirname, '..', '..', 'proto', 'layerd', 'v1', 'layerd.proto');
  const definition = protoLoader.loadSync(proto, { keepCase: true, enums: String, longs: String, defaults: true });
  const { LayerService } = grpc.loadPackageDefinition(definition).layerd.v1;
  const client = new LayerService(addr, grpc.credentials.createInsecure());

  const sessionId = require('crypto').randomBytes(16).toString('hex');
  const call = caller(client, sessionId);
  await call('CreateSession', { session_id: sessionId, idle_timeout_seconds: 60 });
  const member = (name, kind, config) => ({ name, kind, config: config || null });
  await call('CreateLayer', {
    session_id: sessionId,
    layer_id: 'net',
    kind: 'sequential',
    dtype: 'DTYPE_FLOAT32',
    config: {
      sequential: {
        layers: [
          member('fc1', 'affine', { affine: { in_features: 2, out_features: 16, init: { seed: 1 } } }),
          member('relu', 'relu'),
          member('fc2', 'affine', { affine: { in_features: 16, out_features: 3, init: { seed: 2 } } }),
          member('loss', 'softmax_with_loss'),
        ],
      },
    },
  });
  await call('CreateOptimizer', { session_id: sessionId, optimizer_id: 'adam', adam: { lr: 0.05 } });

  const data = blobs(300, generator(7));
  const x = float32Tensor(data.x, [data.t.length, 2]);
  const t = int64Tensor(data.t);
  let loss = Infinity;
  for (let step = 0; step < steps; step++) {
    const answer = await retried(call, 'TrainStep', {
      session_id: sessionId, layer_id: 'net', optimizer_id: 'adam', x, t, expected_step: String(step),
    });
    loss = answer.loss;
    if (step % every === 0 || step === steps - 1) console.log(`step ${String(step).padStart(4)}  loss ${loss}`);
  }
  const scores = fromFloat32((await retried(call, 'Forward', {
    session_id: sessionId, layer_id: 'net', x, eval: true, no_grad: true,
  })).y);
  let correct = 0;
  data.t.forEach((c, i) => {
    const row = scores.slice(3 * i, 3 * i + 3);
    if (row.indexOf(Math.max(...row)) === c) correct++;
  });
  console.log(`training accuracy ${(correct / data.t.length).toFixed(4)}`);
  await retried(call, 'CloseSession', { session_id: sessionId });
  client.close();
  if (!(loss < TARGET_LOSS)) {
    console.error(`loss ${loss} did not fall below ${TARGET_LOSS}`);
    process.exit(1);
  }
  console.log(`loss ${loss.toFixed(6)} < ${TARGET_LOSS}`);
}

main().catch((error) => {
  console.error(error.message || error);
  process.exit(1);
});
