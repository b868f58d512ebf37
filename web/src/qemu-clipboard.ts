// Clipboard text for QEMU's VNC server, as the guest wants it.
//
// noVNC sends clipboard text as the VNC extended clipboard defines it: CRLF line breaks and a
// terminating NUL. QEMU's VNC server hands those bytes to the guest's agent unchanged (it does not
// convert them back), so a Linux guest would get "\r\n" and a trailing NUL in every paste. The
// console talks to QEMU only, so its Provide message carries the text itself: UTF-8, the line
// breaks as typed, no NUL. The message is otherwise the one noVNC builds (flags, then a zlib
// stream of a 4-byte length and the text); the stream uses stored blocks, which every inflater
// reads and which need no compressor here.

const ACTION_PROVIDE = 1 << 28;
const FORMAT_TEXT = 1 << 0;

// A zlib stream (RFC 1950) of uncompressed deflate blocks (RFC 1951, BTYPE 00).
function zlibStored(data: Uint8Array): Uint8Array {
  const blocks = Math.max(1, Math.ceil(data.length / 65535));
  const out = new Uint8Array(2 + blocks * 5 + data.length + 4);
  out[0] = 0x78; // deflate, 32 KiB window
  out[1] = 0x01; // header check: 0x7801 is a multiple of 31
  let o = 2;
  for (let b = 0; b < blocks; b++) {
    const chunk = data.subarray(b * 65535, Math.min(data.length, (b + 1) * 65535));
    out[o++] = b === blocks - 1 ? 1 : 0; // BFINAL on the last block; BTYPE 00
    out[o++] = chunk.length & 0xff;
    out[o++] = chunk.length >> 8;
    out[o++] = ~chunk.length & 0xff;
    out[o++] = (~chunk.length >> 8) & 0xff;
    out.set(chunk, o);
    o += chunk.length;
  }
  let a = 1;
  let s = 0;
  for (const byte of data) {
    a = (a + byte) % 65521;
    s = (s + a) % 65521;
  }
  new DataView(out.buffer).setUint32(o, ((s << 16) | a) >>> 0); // Adler-32, big-endian
  return out;
}

export function providePlainText(messages: any) {
  if (!messages?.extendedClipboardProvide || !messages?.clientCutText || messages.plainTextProvide) return;
  const original = messages.extendedClipboardProvide;
  messages.extendedClipboardProvide = (sock: unknown, formats: number[], texts: string[]) => {
    if (formats.length !== 1 || formats[0] !== FORMAT_TEXT) return original(sock, formats, texts);
    const text = new TextEncoder().encode(texts[0]);
    const payload = new Uint8Array(4 + text.length);
    new DataView(payload.buffer).setUint32(0, text.length);
    payload.set(text, 4);
    const zipped = zlibStored(payload);
    const message = new Uint8Array(4 + zipped.length);
    message[0] = ACTION_PROVIDE >>> 24;
    message[3] = FORMAT_TEXT;
    message.set(zipped, 4);
    messages.clientCutText(sock, message, true);
  };
  messages.plainTextProvide = true;
}
