// The desktop in the browser: noVNC over the cloudpc gateway, full window, with the clipboard
// bridged both ways and a new ticket fetched to reconnect when the connection drops.
import RFB from "@novnc/novnc";
import { api } from "./api";

export function openConsole(root: HTMLElement, id: string, name: string, onClose: () => void) {
  root.innerHTML = `
    <div id="console">
      <div class="bar">
        <button class="secondary" id="back">Back</button>
        <span id="state">Connecting to ${name}…</span>
        <input id="clip" placeholder="Type or paste here, then Send, to paste into the Cloud PC" />
        <button id="send">Send</button>
        <button class="secondary" id="cad">Ctrl+Alt+Del</button>
      </div>
      <div id="screen"></div>
    </div>`;
  const screen = root.querySelector<HTMLElement>("#screen")!;
  const state = root.querySelector<HTMLElement>("#state")!;
  const clip = root.querySelector<HTMLInputElement>("#clip")!;
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
  root.querySelector("#send")!.addEventListener("click", () => rfb?.clipboardPasteFrom(clip.value));
  root.querySelector("#cad")!.addEventListener("click", () => rfb?.sendCtrlAltDel());
  connect();
}
