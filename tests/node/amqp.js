#!/usr/bin/env node
// AMQP 0-9-1 publisher and consumer (amqplib) for sonde's integration tests.
//
//   node amqp.js consume URL EXCHANGE TYPE COUNT ACK QUEUE:KEY...
//       declares EXCHANGE (when not empty) and each queue, binds, consumes; prints
//       READY once every consumer is registered, then a JSON line after COUNT
//       deliveries; ACK is manual or auto
//   node amqp.js publish URL EXCHANGE TYPE RK COUNT SIZE CONFIRM ID_PREFIX
//       CONFIRM is confirm or none; prints a JSON line when done
'use strict';
const amqp = require('amqplib');

function body(i, size) {
  const head = `{"order_id":${i},"pad":"`;
  const tail = '"}';
  return Buffer.from(head + 'x'.repeat(Math.max(0, size - head.length - tail.length)) + tail);
}

async function consume(url, exchange, type, count, ack, queues) {
  const conn = await amqp.connect(url);
  const ch = await conn.createChannel();
  if (exchange) await ch.assertExchange(exchange, type, { durable: false });
  const received = [];
  let done;
  const finished = new Promise((r) => { done = r; });
  for (const spec of queues) {
    const [queue, key] = spec.split(':');
    await ch.assertQueue(queue, { durable: false });
    if (exchange) await ch.bindQueue(queue, exchange, key || '');
    await ch.consume(queue, (msg) => {
      if (ack === 'manual') ch.ack(msg);
      received.push({ queue, routing_key: msg.fields.routingKey, size: msg.content.length,
        redelivered: msg.fields.redelivered, delivery_tag: msg.fields.deliveryTag,
        message_id: msg.properties.messageId });
      if (received.length >= count) done();
    }, { noAck: ack === 'auto' });
  }
  process.stdout.write('READY\n');
  const timer = setTimeout(() => { console.error(`timed out with ${received.length}`); process.exit(1); }, 60000);
  await finished;
  clearTimeout(timer);
  await ch.close();
  await conn.close();
  process.stdout.write(JSON.stringify({ received }) + '\n');
}

async function publish(url, exchange, type, rk, count, size, confirm, prefix) {
  const conn = await amqp.connect(url);
  const ch = confirm ? await conn.createConfirmChannel() : await conn.createChannel();
  if (exchange) await ch.assertExchange(exchange, type, { durable: false });
  let acked = 0;
  for (let i = 1; i <= count; i++) {
    const opts = { contentType: 'application/json', messageId: `${prefix}-${i}`,
      correlationId: `order-${i}` };
    if (confirm) {
      await new Promise((resolve, reject) => {
        ch.publish(exchange, rk, body(i, size), opts, (err) => (err ? reject(err) : resolve()));
      });
      acked++;
    } else {
      ch.publish(exchange, rk, body(i, size), opts);
    }
  }
  await ch.close();
  await conn.close();
  process.stdout.write(JSON.stringify({ published: count, acked }) + '\n');
}

const [cmd, ...a] = process.argv.slice(2);
let p;
if (cmd === 'consume') {
  p = consume(a[0], a[1], a[2], Number(a[3]), a[4], a.slice(5));
} else if (cmd === 'publish') {
  p = publish(a[0], a[1], a[2], a[3], Number(a[4]), Number(a[5]), a[6] === 'confirm', a[7]);
} else {
  console.error('usage: amqp.js consume ... | publish ...');
  process.exit(2);
}
p.catch((e) => { console.error(e); process.exit(1); });
