#!/usr/bin/env node
// HTTPS server and client for sonde's integration tests (Node.js carries its own
// OpenSSL, linked statically into the node binary).
//
//   node https.js server CERT KEY          listens on 127.0.0.1:0, prints "PORT n"
//   node https.js client CA BASE REQ...    one keep-alive connection; REQ is
//                                          GET:/path or POST:/path:SIZE; prints JSON
//
// Routes as tests/go/main.go: GET /orders/{id}, GET /big?size=N, POST /upload,
// GET /missing (404), GET /boom (500).
'use strict';
const fs = require('fs');
const https = require('https');

function send(res, status, type, body) {
  res.writeHead(status, { 'Content-Type': type, 'Content-Length': body.length });
  res.end(body);
}

function server(certFile, keyFile) {
  const srv = https.createServer({ cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile),
    ALPNProtocols: ['http/1.1'], keepAliveTimeout: 60000 }, (req, res) => {
    const url = new URL(req.url, 'https://localhost');
    let m;
    if (req.method === 'GET' && (m = url.pathname.match(/^\/orders\/([^/]+)$/))) {
      send(res, 200, 'application/json', Buffer.from(JSON.stringify({ order_id: m[1], status: 'created' })));
    } else if (req.method === 'GET' && url.pathname === '/big') {
      send(res, 200, 'application/octet-stream', Buffer.alloc(Number(url.searchParams.get('size')), 'b'));
    } else if (req.method === 'POST' && url.pathname === '/upload') {
      let n = 0;
      req.on('data', (c) => { n += c.length; });
      req.on('end', () => send(res, 200, 'application/json', Buffer.from(JSON.stringify({ received: n }))));
    } else if (url.pathname === '/boom') {
      send(res, 500, 'text/plain', Buffer.from('boom\n'));
    } else {
      send(res, 404, 'text/plain', Buffer.from('not found\n'));
    }
  });
  srv.listen(0, '127.0.0.1', () => {
    process.stdout.write(`PORT ${srv.address().port}\n`);
  });
  process.on('SIGTERM', () => process.exit(0));
}

function request(agent, ca, base, spec) {
  const [method, path, size] = spec.split(':');
  return new Promise((resolve, reject) => {
    const body = method === 'POST' ? Buffer.alloc(Number(size), 'p') : null;
    const headers = { 'User-Agent': 'sonde-test-node/1.0' };
    if (body) {
      headers['Content-Type'] = 'application/octet-stream';
      headers['Content-Length'] = body.length;
    }
    const req = https.request(base + path, { method, agent, ca, headers }, (res) => {
      let n = 0;
      res.on('data', (c) => { n += c.length; });
      res.on('end', () => resolve({ method, path, status: res.statusCode, len: n,
        local: `${req.socket.localAddress}:${req.socket.localPort}` }));
    });
    req.on('error', reject);
    req.end(body || undefined);
  });
}

async function client(caFile, base, specs) {
  const ca = fs.readFileSync(caFile);
  const agent = new https.Agent({ keepAlive: true, maxSockets: 1, ca });
  const out = [];
  for (const spec of specs) {
    out.push(await request(agent, ca, base, spec));
  }
  agent.destroy();
  const conns = new Set(out.map((r) => r.local)).size;
  process.stdout.write(JSON.stringify({ responses: out, connections: conns }) + '\n');
}

const [cmd, ...args] = process.argv.slice(2);
if (cmd === 'server') {
  server(args[0], args[1]);
} else if (cmd === 'client') {
  client(args[0], args[1], args.slice(2)).catch((e) => { console.error(e); process.exit(1); });
} else {
  console.error('usage: https.js server CERT KEY | client CA BASE REQ...');
  process.exit(2);
}
