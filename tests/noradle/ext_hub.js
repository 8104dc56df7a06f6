// A test peer that emulates the on-the-wire behaviour of Noradle's DCO ext-hub (ext_hub.js),
// quirks included, so dcod's worker can be tested behind it. Written from the protocol
// description in dcod's docs/ARCHITECTURE.md §2 and notes on how the original behaved; it contains no
// Noradle code.
//
//   node ext_hub.js PORT ID=HOST:PORT ... [--log-pdus]     (PORT 0: any free port; it is printed)
//
// Reproduced: the first chunk from Oracle must start with 197610262 (16 bytes: magic, sid,
// serial, audsid read as UInt32BE), else the connection is closed; Oracle PDUs (length,
// proxy_id, rseq) get bytes 4..8 overwritten with the audsid and go to that proxy's worker
// connection, or are queued in memory while it is not connected (unknown proxy: dropped);
// connecting to a worker writes the magic 197610263, then the queued PDUs; worker PDUs are
// split by |length|; one with length exactly 12 is taken as the quit notice (so is an
// empty-bodied reply: the original's quirk) and the hub half-closes that connection; any other
// goes unchanged to the Oracle connection whose audsid is at offset 4.
// Assumed (not known from the original): a lost worker connection is retried every 50 ms.
// stdout gets one JSON event per line. With --log-pdus, a line per PDU each way goes to stderr
// through console.error, as the original logs every PDU through console.log by default; for
// measuring what that costs (bench/noradle_hub.py --log-pdus), it changes nothing on the wire.
'use strict';
const net = require('net');
const { StreamSplitter } = require('./splitter');

const ORACLE_MAGIC = 197610262, HUB_MAGIC = 197610263, RETRY_MS = 50;
const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n');
const args = process.argv.slice(2).filter((arg) => arg !== '--log-pdus');
const logPdu = process.argv.includes('--log-pdus') ? console.error : () => {};


const sessions = new Map(); // audsid -> Oracle socket
const workers = new Map(); // proxy id -> { host, port, sock, up, queue }
for (const arg of args.slice(1)) {
  const [id, address] = arg.split('=');
  const colon = address.lastIndexOf(':');
  workers.set(Number(id), { id: Number(id), host: address.slice(0, colon), port: Number(address.slice(colon + 1)), sock: null, up: false, queue: [] });
}

function connectWorker(w) {
  const sock = net.connect(w.port, w.host);
  let connected = false;
  sock.on('connect', () => {
    connected = true;
    w.sock = sock;
    w.up = true;
    const magic = Buffer.alloc(4);
    magic.writeInt32BE(HUB_MAGIC, 0);
    sock.write(magic);
    emit({ event: 'worker_connected', proxy: w.id, queued: w.queue.length });
    for (const pdu of w.queue.splice(0)) sock.write(pdu);
  });
  const splitter = new StreamSplitter((pdu) => {
    const len = pdu.readInt32BE(0), audsid = pdu.readUInt32BE(4), rseq = pdu.readInt32BE(8);
    if (len === 12) { // the quit notice (or, wrongly, an empty reply)
      emit({ event: 'quit', proxy: w.id, len, audsid, rseq });
      w.up = false;
      sock.end();
      return;
    }
    const session = sessions.get(audsid);
    if (session) { session.write(pdu); logPdu('< ora(%d,%d) - wp(%d)', audsid, rseq, w.id); } else emit({ event: 'orphan', proxy: w.id, audsid, rseq });
  }, (len) => { emit({ event: 'garbage', proxy: w.id, len }); sock.destroy(); });
  sock.on('data', (chunk) => splitter.feed(chunk));
  sock.on('error', (e) => { if (connected) emit({ event: 'worker_error', proxy: w.id, message: e.message }); });
  sock.on('close', () => {
    if (connected) emit({ event: 'worker_closed', proxy: w.id });
    if (w.sock === sock) { w.sock = null; w.up = false; }
    setTimeout(() => connectWorker(w), connected ? 0 : RETRY_MS);
  });
}

const server = net.createServer((sock) => {
  let audsid = null;
  const splitter = new StreamSplitter((pdu) => {
    const proxy = pdu.readInt32BE(4), rseq = pdu.readInt32BE(8);
    const w = workers.get(proxy);
    if (!w) { emit({ event: 'dropped', proxy, audsid, rseq }); return; }
    logPdu('> ora(%d,%d) - wp(%d)', audsid, rseq, proxy);
    pdu.writeUInt32BE(audsid, 4);
    if (w.up) w.sock.write(pdu); else { w.queue.push(pdu); emit({ event: 'queued', proxy, audsid, rseq }); }
  }, (len) => { emit({ event: 'garbage', audsid, len }); sock.destroy(); });
  sock.on('data', (chunk) => {
    if (audsid === null) {
      if (chunk.length < 16 || chunk.readInt32BE(0) !== ORACLE_MAGIC) { emit({ event: 'bad_magic' }); sock.destroy(); return; }
      audsid = chunk.readUInt32BE(12);
      sessions.set(audsid, sock);
      emit({ event: 'session', audsid });
      chunk = chunk.subarray(16);
    }
    splitter.feed(chunk);
  });
  sock.on('error', () => {});
  sock.on('close', () => { if (sessions.get(audsid) === sock) sessions.delete(audsid); });
});
server.listen(Number(args[0]), '127.0.0.1', () => {
  emit({ event: 'listening', port: server.address().port });
  for (const w of workers.values()) connectWorker(w);
});
