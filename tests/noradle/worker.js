// A test peer that emulates the on-the-wire behaviour of Noradle's DCO worker proxy
// (dco_proxy.js), quirks included, so dcod's hub can be tested against it. Written from
// the protocol description in dcod's docs/ARCHITECTURE.md §2 and notes on how the original behaved;
// it contains no Noradle code.
//
//   node worker.js PORT
//
// Reproduced: net.createServer() with default options (so no half-open sockets: when the
// hub half-closes, Node ends our side too); the first data chunk of a connection must start
// with the magic 197610263, and if it is longer than 12 bytes, chunk.slice(12) goes on as data
// (the original's bug: the magic is 4 bytes, so bytes 4..12 of a coalesced chunk are lost);
// PDUs split by |Int32BE length|; a sync request (length > 0) is answered with its own header,
// length rewritten to 12 + body length, written as the header and then each body chunk in
// separate socket.write() calls; a one-way request (length < 0) gets nothing; on SIGTERM or
// SIGINT a 12-byte quit notice with length field 6 (6, 0, 0) goes to every hub connection and
// the process exits once nothing is in flight.
// Assumed (not known from the original): on SIGTERM it also stops accepting connections.
// For the tests: the handler replies "noradle:" + body (two body chunks); a body starting with
// "hold" is answered only after a "release" line on stdin; stdout gets one JSON event per line
// ("quirk" when the magic came with more bytes, which the original would have mangled).
'use strict';
const net = require('net');
const { StreamSplitter } = require('./splitter');
const readline = require('readline');

const HUB_MAGIC = 197610263;
const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n');


const hubs = new Set();
const held = [];
let inflight = 0; // replies (and quit notices) not yet handed to the kernel
let quitting = false;

function finished() {
  inflight--;
  if (quitting && inflight === 0) { emit({ event: 'exit' }); process.exit(0); }
}

function onRequest(sock, pdu) {
  const len = pdu.readInt32BE(0), audsid = pdu.readUInt32BE(4), rseq = pdu.readInt32BE(8);
  const body = pdu.subarray(12);
  emit({ event: 'request', len, audsid, rseq, body: body.length });
  if (len < 0) return; // one-way
  inflight++;
  const respond = () => {
    const chunks = [Buffer.from('noradle:'), body].filter((c) => c.length);
    const head = Buffer.from(pdu.subarray(0, 12));
    head.writeInt32BE(12 + chunks.reduce((n, c) => n + c.length, 0), 0);
    sock.write(head);
    chunks.forEach((c, i) => sock.write(c, i === chunks.length - 1 ? finished : undefined));
  };
  if (body.subarray(0, 4).toString() === 'hold') { held.push(respond); emit({ event: 'held', rseq }); } else respond();
}

const server = net.createServer((sock) => {
  hubs.add(sock);
  emit({ event: 'connection' });
  const splitter = new StreamSplitter((pdu) => onRequest(sock, pdu), (len) => {
    emit({ event: 'garbage', len });
    sock.destroy();
  });
  let first = true;
  sock.on('data', (chunk) => {
    if (first) {
      first = false;
      if (chunk.length < 4 || chunk.readInt32BE(0) !== HUB_MAGIC) { emit({ event: 'bad_magic' }); sock.destroy(); return; }
      emit({ event: 'handshake', first_chunk: chunk.length });
      if (chunk.length > 4) emit({ event: 'quirk', first_chunk: chunk.length, lost: Math.min(chunk.length, 12) - 4 });
      if (chunk.length <= 12) return;
      chunk = chunk.slice(12);
    }
    splitter.feed(chunk);
  });
  sock.on('error', (e) => emit({ event: 'socket_error', message: e.message }));
  sock.on('close', () => { hubs.delete(sock); emit({ event: 'closed' }); });
});

function quit(signal) {
  if (quitting) return;
  quitting = true;
  server.close();
  const notice = Buffer.alloc(12);
  notice.writeInt32BE(6, 0);
  emit({ event: 'quit', signal, hubs: hubs.size, inflight });
  inflight++;
  for (const sock of hubs) { inflight++; sock.write(notice, finished); }
  finished();
}
process.on('SIGTERM', () => quit('SIGTERM'));
process.on('SIGINT', () => quit('SIGINT'));
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (line.trim() === 'release') held.splice(0).forEach((respond) => respond());
});
server.listen(Number(process.argv[2]), '127.0.0.1', () => emit({ event: 'listening', port: server.address().port }));
