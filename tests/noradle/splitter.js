// Splits a byte stream into PDUs by the absolute Int32BE length at offset 0, as Noradle's
// StreamSpliter did; shared by the emulated hub and worker.
'use strict';

class StreamSplitter {
  constructor(onPdu, onGarbage) { this.buf = Buffer.alloc(0); this.onPdu = onPdu; this.onGarbage = onGarbage; }
  feed(chunk) {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    while (this.buf.length >= 12) {
      const len = Math.abs(this.buf.readInt32BE(0));
      if (len < 12) return this.onGarbage(len); // the original would misframe from here on
      if (this.buf.length < len) break;
      const pdu = this.buf.subarray(0, len);
      this.buf = this.buf.subarray(len);
      this.onPdu(pdu);
    }
  }
}

module.exports = { StreamSplitter };
