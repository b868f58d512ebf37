// The cloudpc user portal: sign in, see your Cloud PCs (and the provisioning step each is on),
// restart or rename one, and open it in the browser.
import { api, ApiError, CloudPc } from "./api";
import { openConsole } from "./console";

const app = document.getElementById("app")!;
let poll: number | undefined;

function escape(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!);
}

interface SignInOptions {
  localAccounts: boolean;
  providers: { id: string; displayName: string }[];
}

// The identity providers configured, each a "Sign in with …" link; local accounts when allowed.
async function signInOptions(): Promise<SignInOptions> {
  try {
    const r = await fetch("/auth/signInOptions");
    if (r.ok) return await r.json();
  } catch {
    /* offline: the password form still shows */
  }
  return { localAccounts: true, providers: [] };
}

async function showSignIn(message = "") {
  clearInterval(poll);
  // An error the provider sign-in came back with is shown once, then dropped from the address.
  const url = new URL(location.href);
  const fromProvider = url.searchParams.get("signInError");
  if (fromProvider) {
    message = fromProvider;
    history.replaceState(null, "", "/");
  }
  const options = await signInOptions();
  const providers = options.providers
    .map((p) => `<a class="button provider" href="/auth/oidc/${encodeURIComponent(p.id)}/start?target=portal">Sign in with ${escape(p.displayName)}</a>`)
    .join("");
  app.innerHTML = `
    <form class="signin">
      <h1>cloudpc</h1>
      ${providers}
      ${options.localAccounts ? `<input name="upn" type="email" autocomplete="username" placeholder="name@example.com" required />
      <input name="password" type="password" autocomplete="current-password" placeholder="Password" required />
      <button type="submit">Sign in</button>` : ""}
      <div class="error" role="alert">${escape(message)}</div>
    </form>`;
  const form = app.querySelector("form")!;
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const data = new FormData(form);
    try {
      await api.signIn(String(data.get("upn")), String(data.get("password")));
      showHome();
    } catch (err: any) {
      form.querySelector(".error")!.textContent = err.message;
    }
  });
}

function statusLine(pc: CloudPc): string {
  if (pc.status === "provisioning" || pc.status === "pendingProvision") {
    return `${pc.status}${pc.currentStep ? ` — step: ${pc.currentStep}` : ""}`;
  }
  if (pc.powerStateDetail === "saved") return `${pc.status} — hibernated; opening it resumes it where you left it`;
  return pc.statusDetail ? `${pc.status} — ${pc.statusDetail}` : pc.status;
}

async function showHome() {
  let me: any;
  try {
    me = await api.me();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return showSignIn();
    throw err;
  }
  app.innerHTML = `
    <header><strong>cloudpc</strong><span>${escape(me.displayName)} <button id="signout">Sign out</button></span></header>
    <main><h1>My Cloud PCs</h1><div class="cards" id="cards">Loading…</div></main>`;
  app.querySelector("#signout")!.addEventListener("click", async () => {
    await api.signOut().catch(() => {});
    showSignIn();
  });
  const render = async () => {
    const cards = app.querySelector("#cards");
    if (!cards) return;
    let pcs: CloudPc[];
    try {
      pcs = await api.cloudPcs();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) return showSignIn("Your session ended; sign in again.");
      return;
    }
    if (pcs.length === 0) {
      cards.innerHTML = "<p>You have no Cloud PCs yet.</p>";
      return;
    }
    cards.innerHTML = pcs
      .map((pc) => {
        const ready = ["provisioned", "provisionedWithWarnings", "inGracePeriod"].includes(pc.status);
        const saved = pc.powerStateDetail === "saved" ? "yes" : "no";
        return `<div class="card" data-id="${pc.id}" data-status="${escape(pc.status)}" data-saved="${saved}">
          <h2>${escape(pc.displayName)}</h2>
          <div class="status">${escape(pc.managedDeviceName ?? "")} · ${escape(statusLine(pc))}</div>
          <div class="actions">
            <button data-act="open" ${ready ? "" : "disabled"}>Open in browser</button>
            <button class="secondary" data-act="reboot" ${ready ? "" : "disabled"}>Restart</button>
            <button class="secondary" data-act="rename">Rename</button>
          </div></div>`;
      })
      .join("");
    cards.querySelectorAll<HTMLButtonElement>("button[data-act]").forEach((b) =>
      b.addEventListener("click", async () => {
        const card = b.closest<HTMLElement>(".card")!;
        const id = card.dataset.id!;
        const name = card.querySelector("h2")!.textContent ?? "";
        if (b.dataset.act === "open") {
          clearInterval(poll);
          openConsole(app, id, name, showHome, card.dataset.saved === "yes");
        } else if (b.dataset.act === "reboot") {
          await api.reboot(id).catch((e) => alert(e.message));
        } else {
          const next = prompt("New name for this Cloud PC", name);
          if (next) await api.rename(id, next).catch((e) => alert(e.message));
          render();
        }
      }),
    );
  };
  await render();
  clearInterval(poll);
  poll = window.setInterval(render, 3000);
}

showHome();
