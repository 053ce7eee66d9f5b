#!/usr/bin/env node
// The demo's CRM: orders and their statuses, over HTTPS (Node's https module, no
// framework, no tracing code). State is in memory.
//
//   POST /orders                 register an order  {"order_id", "customer", "material"}
//   POST /orders/{id}/status     a status from the MES  {"order_id", "status", "stage"}
//   GET  /orders/{id}            the order with its status history
//
// Faults on purpose, decided by the order's number (the digits at the end of its id)
// so that a fixed set of orders always meets the same ones: CRM_SLOW (a comma list of
// numbers modulo CRM_FAULT_CYCLE) makes registering that order slow (CRM_SLOW_MS), and
// CRM_FLAKY makes the first status report of that order fail with 503.
'use strict';
const https = require('https');
const fs = require('fs');

const [port, cert, key] = process.argv.slice(2);
if (!port || !cert || !key) {
  console.error('usage: crm.js PORT CERT KEY');
  process.exit(2);
}
const cycle = Number(process.env.CRM_FAULT_CYCLE || 8);
const list = (v) => new Set((v || '').split(',').filter(Boolean).map(Number));
const slow = list(process.env.CRM_SLOW);
const flaky = list(process.env.CRM_FLAKY);
const slowMs = Number(process.env.CRM_SLOW_MS || 1500);
const orders = new Map();
const failedOnce = new Set();

function number(id) {
  const m = /(\d+)$/.exec(id || '');
  return m ? Number(m[1]) % cycle : -1;
}

function reply(res, code, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(code, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

function handle(req, res, raw) {
  let body = {};
  if (raw.length) {
    try {
      body = JSON.parse(raw);
    } catch (e) {
      return reply(res, 400, { error: 'body is not JSON' });
    }
  }
  const path = req.url.split('?')[0];
  let m;
  if (req.method === 'POST' && path === '/orders') {
    if (!body.order_id) return reply(res, 400, { error: 'order_id is missing' });
    const o = { order_id: body.order_id, customer: body.customer, material: body.material,
      status: 'registered', history: [{ status: 'registered', at: Date.now() }] };
    orders.set(o.order_id, o);
    const answer = () => reply(res, 201, { order_id: o.order_id, status: o.status });
    return slow.has(number(o.order_id)) ? setTimeout(answer, slowMs) : answer();
  }
  if (req.method === 'POST' && (m = /^\/orders\/([^/]+)\/status$/.exec(path))) {
    const id = decodeURIComponent(m[1]);
    const o = orders.get(id);
    if (!o) return reply(res, 404, { error: `no order ${id}` });
    if (flaky.has(number(id)) && !failedOnce.has(id)) {
      failedOnce.add(id);
      return reply(res, 503, { error: 'CRM database busy, retry' });
    }
    o.status = body.status;
    o.history.push({ status: body.status, stage: body.stage || null, at: Date.now() });
    return reply(res, 200, { order_id: id, status: o.status });
  }
  if (req.method === 'GET' && (m = /^\/orders\/([^/]+)$/.exec(path))) {
    const o = orders.get(decodeURIComponent(m[1]));
    return o ? reply(res, 200, o) : reply(res, 404, { error: 'no such order' });
  }
  return reply(res, 404, { error: `no route ${req.method} ${path}` });
}

const server = https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) }, (req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => handle(req, res, Buffer.concat(chunks).toString()));
});
server.keepAliveTimeout = 60000;
server.listen(Number(port), '127.0.0.1', () => console.log('READY'));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
