// The desktop in the browser: noVNC over the cloudpc gateway, full window, with the clipboard
// bridged both ways and a new ticket fetched to reconnect when the connection drops. The clipboard
// box sends its text to the Cloud PC's clipboard and shows what is copied there: QEMU's VNC server
// passes both to the guest's spice-vdagent through the VM's qemu-vdagent channel. A textarea, so
// that copied lines keep their line breaks.
import RFB from "@novnc/novnc";
import { api } from "./api";
import { providePlainText } from "./qemu-clipboard";

// Else the guest gets noVNC's CRLF line breaks and a trailing NUL: QEMU passes them on as they are.
providePlainText((RFB as any).messages);

// `saved`: the Cloud PC is hibernated; asking for a ticket resumes it, which takes a few seconds.
export function openConsole(root: HTMLElement, id: string, name: string, onClose: () => void, saved = false) {
  root.innerHTML = `
    <div id="console">
      <div class="bar">
        <button class="secondary" id="back">Back</button>
        <span id="state"></span>
        <textarea id="clip" rows="1" placeholder="Clipboard: type or paste here, then Send, to paste into the Cloud PC; what is copied there shows here"></textarea>
        <button id="send">Send</button>
        <button class="secondary" id="cad">Ctrl+Alt+Del</button>
      </div>
      <div id="screen"></div>
    </div>`;
  const screen = root.querySelector<HTMLElement>("#screen")!;
  const state = root.querySelector<HTMLElement>("#state")!;
  state.textContent = `${saved ? "Resuming" : "Connecting to"} ${name}…`;
  const clip = root.querySelector<HTMLTextAreaElement>("#clip")!;
  let rfb: any = null;
  let closing = false;
  let retries = 0;

  async function connect() {
    try {
      const { url } = await api.ticket(id);
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      rfb = new RFB(screen, `${scheme}://${location.host}${url}`, { wsProtocols: ["binary"] });
      rfb.scaleViewport = true;
      rfb.focusOnClick = true;
      rfb.addEventListener("connect", () => {
        retries = 0;
        state.textContent = `Connected to ${name}`;
        rfb.focus();
      });
      rfb.addEventListener("clipboard", (e: any) => {
        clip.value = e.detail.text;
        navigator.clipboard?.writeText(e.detail.text).catch(() => {});
      });
      rfb.addEventListener("disconnect", (e: any) => {
        if (closing) return;
        state.textContent = e.detail.clean ? "Disconnected" : "Connection lost; reconnecting…";
        if (retries++ < 5) setTimeout(connect, 1000 * retries);
      });
    } catch (err: any) {
      state.textContent = `Cannot open the Cloud PC: ${err.message}`;
    }
  }

  root.querySelector("#back")!.addEventListener("click", () => {
    closing = true;
    rfb?.disconnect();
    onClose();
  });
  // Back to the screen after sending, so that the user can paste there at once.
  root.querySelector("#send")!.addEventListener("click", () => {
    rfb?.clipboardPasteFrom(clip.value);
    rfb?.focus();
  });
  root.querySelector("#cad")!.addEventListener("click", () => rfb?.sendCtrlAltDel());
  connect();
}
