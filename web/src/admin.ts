// The cloudpc admin console: the Graph-shaped API in a browser. Admins sign in with an API token
// (kept in this tab's sessionStorage only); Cloud PC Readers see everything and change nothing
// (write controls are hidden, and the API refuses writes anyway).

const VE = "/v1.0/deviceManagement/virtualEndpoint";
const app = document.getElementById("app")!;
let token = sessionStorage.getItem("cloudpc-token") ?? "";
let isAdmin = false;
let tab = "cloudpcs";

function esc(v: unknown): string {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!);
}

async function api(method: string, path: string, body?: unknown): Promise<any> {
  const resp = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${token}`, ...(body === undefined ? {} : { "Content-Type": "application/json" }) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(data?.error?.message ?? `HTTP ${resp.status}`);
  return data;
}

// XMLHttpRequest rather than fetch: only it reports upload progress.
function upload(path: string, file: File): Promise<any> {
  const progress = document.getElementById("upprogress");
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Authorization", `Bearer ${token}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => {
      if (progress && e.lengthComputable) progress.textContent = `Uploading ${file.name}: ${Math.round((100 * e.loaded) / e.total)}%`;
    };
    xhr.onload = () => {
      if (progress) progress.textContent = "";
      const data = (() => { try { return JSON.parse(xhr.responseText); } catch { return {}; } })();
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new Error(data?.error?.message ?? `HTTP ${xhr.status}`));
    };
    xhr.onerror = () => reject(new Error("the upload broke off"));
    xhr.send(file);
  });
}

async function list(path: string): Promise<any[]> {
  const out: any[] = [];
  let next: string | null = path.includes("?") ? `${path}&$top=999` : `${path}?$top=999`;
  while (next) {
    const page = await api("GET", next.replace(location.origin, ""));
    out.push(...page.value);
    next = page["@odata.nextLink"] ?? null;
  }
  return out;
}

function table(rows: any[], cols: [string, (r: any) => string][]): string {
  return `<table><tr>${cols.map(([h]) => `<th>${h}</th>`).join("")}</tr>${rows
    .map((r) => `<tr>${cols.map(([, f]) => `<td>${f(r)}</td>`).join("")}</tr>`)
    .join("")}</table>`;
}

function form(id: string, fields: string, button: string): string {
  return `<fieldset class="write"><form id="${id}" style="display:contents">${fields}<button>${button}</button></form></fieldset>`;
}

// A sign-in through an identity provider comes back with the console's API token (or the
// reason it was refused) in the fragment, which no server sees; it is moved to sessionStorage.
{
  const back = new URLSearchParams(location.hash.slice(1));
  if (back.get("token")) {
    token = back.get("token")!;
    sessionStorage.setItem("cloudpc-token", token);
    sessionStorage.setItem("cloudpc-token-signed-in", "1");
  }
  if (back.has("token") || back.has("signInError")) history.replaceState(null, "", location.pathname);
  (window as any).signInError = back.get("signInError") ?? "";
}

async function showSignIn(message = "") {
  let providers = "";
  try {
    const r = await fetch("/auth/signInOptions");
    const options = r.ok ? await r.json() : { providers: [] };
    providers = options.providers
      .map((p: any) => `<a class="button provider" href="/auth/oidc/${encodeURIComponent(p.id)}/start?target=console">Sign in with ${esc(p.displayName)}</a>`)
      .join("");
  } catch {
    /* the token form still shows */
  }
  app.innerHTML = `<form class="signin"><h1>cloudpc admin</h1>${providers}
    <input name="token" type="password" placeholder="API token (cpc_…)" required />
    <button type="submit">Sign in</button><div class="error" role="alert">${esc(message)}</div></form>`;
  app.querySelector("form")!.addEventListener("submit", async (e) => {
    e.preventDefault();
    token = String(new FormData(e.target as HTMLFormElement).get("token"));
    try {
      await api("GET", "/v1.0/users?$top=1");
      sessionStorage.setItem("cloudpc-token", token);
      await start();
    } catch (err: any) {
      showSignIn(err.message);
    }
  });
}

async function start() {
  try {
    await api("GET", "/cloudpc/tokens");
    isAdmin = true;
  } catch {
    isAdmin = false;
  }
  document.body.classList.toggle("reader", !isAdmin);
  render();
}

const TABS: [string, string][] = [
  ["cloudpcs", "Cloud PCs"], ["users", "Users"], ["groups", "Groups"], ["licenses", "Licenses"],
  ["images", "Images"], ["policies", "Provisioning policies"], ["networks", "Network connections"], ["hosts", "Hosts"], ["identity", "Identity providers"], ["audit", "Audit log"],
  ["tokens", "API tokens"],
];

async function render() {
  app.innerHTML = `<header><strong>cloudpc admin</strong><span>${isAdmin ? "Cloud PC Administrator" : "Cloud PC Reader (read only)"}
      <button id="out">Sign out</button></span></header>
    <nav>${TABS.map(([k, t]) => `<button data-tab="${k}" class="${k === tab ? "active" : ""}">${t}</button>`).join("")}</nav>
    <main><div class="error" id="err" role="alert"></div><div id="body">Loading…</div></main>`;
  app.querySelector("#out")!.addEventListener("click", () => {
    // A token this tab got from a provider sign-in is revoked; pasted tokens stay (they are the admin's).
    if (sessionStorage.getItem("cloudpc-token-signed-in")) {
      fetch("/auth/signOut", { method: "POST", headers: { Authorization: `Bearer ${token}` } }).catch(() => {});
      sessionStorage.removeItem("cloudpc-token-signed-in");
    }
    sessionStorage.removeItem("cloudpc-token");
    token = "";
    showSignIn();
  });
  app.querySelectorAll<HTMLButtonElement>("nav button").forEach((b) => b.addEventListener("click", () => { tab = b.dataset.tab!; render(); }));
  const body = app.querySelector<HTMLElement>("#body")!;
  try {
    await VIEWS[tab](body);
  } catch (err: any) {
    app.querySelector("#err")!.textContent = err.message;
  }
}

/// Runs a change, then redraws; errors from the API are shown as they are.
function act(fn: () => Promise<unknown>) {
  return async (e?: Event) => {
    e?.preventDefault();
    try {
      await fn();
      await render();
    } catch (err: any) {
      app.querySelector("#err")!.textContent = err.message;
    }
  };
}

function values(id: string): Record<string, string> {
  return Object.fromEntries(new FormData(document.getElementById(id) as HTMLFormElement)) as Record<string, string>;
}

const VIEWS: Record<string, (el: HTMLElement) => Promise<void>> = {
  async cloudpcs(el) {
    const pcs = await list(`${VE}/cloudPCs`);
    el.innerHTML = table(pcs, [
      ["Name", (p) => esc(p.managedDeviceName ?? p.displayName)],
      ["User", (p) => esc(p.userPrincipalName)],
      ["Policy", (p) => esc(p.provisioningPolicyName)],
      ["Image", (p) => `${esc(p.imageDisplayName)} ${esc(p.imageVersion)}`],
      ["Status", (p) => `<span class="pill" data-status="${esc(p.status)}">${esc(p.status)}</span> ${esc(p.statusDetail)}`],
      ["Power", (p) => `<span class="power">${esc(p.powerState)}${p.powerStateDetail === "saved" ? " (hibernated)" : ""}</span>`],
      ["Actions", (p) => `<button class="secondary" data-steps="${p.id}">Steps</button>` +
        ["reprovision", "retry", "reboot", p.powerState === "running" ? "hibernate" : "resume", "endGracePeriod"]
          .map((a) => ` <button class="secondary write" data-pc="${p.id}" data-act="${a}">${a}</button>`).join("")],
    ]) + `<div id="steps"></div>`;
    el.querySelectorAll<HTMLButtonElement>("button[data-act]").forEach((b) =>
      b.addEventListener("click", act(() => api("POST", `${VE}/cloudPCs/${b.dataset.pc}/${b.dataset.act}`))));
    el.querySelectorAll<HTMLButtonElement>("button[data-steps]").forEach((b) =>
      b.addEventListener("click", async () => {
        const steps = await list(`${VE}/cloudPCs/${b.dataset.steps}/provisioningSteps`);
        el.querySelector("#steps")!.innerHTML = `<h2>Provisioning steps</h2>` + table(steps, [
          ["Attempt", (s) => esc(s.attempt)], ["Step", (s) => esc(s.name)], ["Stage", (s) => esc(s.stage)], ["Status", (s) => esc(s.status)],
          ["Started", (s) => esc(s.startDateTime)], ["ms", (s) => esc(s.durationInMilliseconds)], ["Error / detail", (s) => esc(s.error ?? s.detail)],
        ]);
      }));
  },
  async users(el) {
    const [users, skus] = await Promise.all([list("/v1.0/users"), list("/v1.0/subscribedSkus")]);
    el.innerHTML = form("newuser", `<input name="upn" placeholder="name@domain" required><input name="name" placeholder="Display name" required>
        <input name="password" type="password" placeholder="Portal password">`, "Create user") +
      table(users, [
        ["User principal name", (u) => esc(u.userPrincipalName)], ["Name", (u) => esc(u.displayName)], ["Enabled", (u) => esc(u.accountEnabled)],
        ["", (u) => `<span class="write"><select data-lic="${u.id}"><option value="">Assign license…</option>${skus.map((s) => `<option value="${s.skuId}">${esc(s.skuPartNumber)}</option>`).join("")}</select>
          <button class="secondary" data-del="${u.id}">Delete</button></span>`],
      ]);
    el.querySelector("#newuser")!.addEventListener("submit", act(() => {
      const v = values("newuser");
      return api("POST", "/v1.0/users", { userPrincipalName: v.upn, displayName: v.name, ...(v.password ? { passwordProfile: { password: v.password } } : {}) });
    }));
    el.querySelectorAll<HTMLButtonElement>("button[data-del]").forEach((b) => b.addEventListener("click", act(() => api("DELETE", `/v1.0/users/${b.dataset.del}`))));
    el.querySelectorAll<HTMLSelectElement>("select[data-lic]").forEach((s) => s.addEventListener("change", act(() =>
      api("POST", `/v1.0/users/${s.dataset.lic}/assignLicense`, { addLicenses: [{ skuId: s.value }], removeLicenses: [] }))));
  },
  async groups(el) {
    const [groups, users] = await Promise.all([list("/v1.0/groups"), list("/v1.0/users")]);
    const members = await Promise.all(groups.map((g) => list(`/v1.0/groups/${g.id}/members`)));
    el.innerHTML = form("newgroup", `<input name="name" placeholder="Group name" required><input name="description" placeholder="Description">`, "Create group") +
      table(groups.map((g, i) => ({ ...g, members: members[i] })), [
        ["Group", (g) => esc(g.displayName)],
        ["Members", (g) => g.members.map((m: any) => `${esc(m.userPrincipalName)} <button class="secondary write" data-g="${g.id}" data-rm="${m.id}">×</button>`).join("<br>")],
        ["", (g) => `<span class="write"><select data-add="${g.id}"><option value="">Add member…</option>${users.map((u) => `<option value="${u.id}">${esc(u.userPrincipalName)}</option>`).join("")}</select>
          <button class="secondary" data-delg="${g.id}">Delete</button></span>`],
      ]);
    el.querySelector("#newgroup")!.addEventListener("submit", act(() => { const v = values("newgroup"); return api("POST", "/v1.0/groups", { displayName: v.name, description: v.description || undefined }); }));
    el.querySelectorAll<HTMLSelectElement>("select[data-add]").forEach((s) => s.addEventListener("change", act(() =>
      api("POST", `/v1.0/groups/${s.dataset.add}/members/$ref`, { "@odata.id": `https://graph.microsoft.com/v1.0/directoryObjects/${s.value}` }))));
    el.querySelectorAll<HTMLButtonElement>("button[data-rm]").forEach((b) => b.addEventListener("click", act(() => api("DELETE", `/v1.0/groups/${b.dataset.g}/members/${b.dataset.rm}/$ref`))));
    el.querySelectorAll<HTMLButtonElement>("button[data-delg]").forEach((b) => b.addEventListener("click", act(() => api("DELETE", `/v1.0/groups/${b.dataset.delg}`))));
  },
  async licenses(el) {
    const [skus, groups] = await Promise.all([list("/v1.0/subscribedSkus"), list("/v1.0/groups")]);
    el.innerHTML = form("newsku", `<input name="part" placeholder="Part number" required><input name="seats" type="number" min="0" placeholder="Seats" required>
        <input name="vcpu" type="number" min="1" placeholder="vCPU" required><input name="ram" type="number" min="1" placeholder="RAM GB" required>
        <input name="disk" type="number" min="1" placeholder="Disk GB" required>`, "Create SKU") +
      table(skus, [
        ["SKU", (s) => esc(s.skuPartNumber)], ["Size", (s) => `${s.vCpuCount} vCPU, ${s.ramInGB} GB, ${s.storageInGB} GB`],
        ["Seats used", (s) => `${s.consumedUnits} / ${s.prepaidUnits.enabled}`],
        ["", (s) => `<select class="write" data-sku="${s.skuId}"><option value="">Assign to group…</option>${groups.map((g) => `<option value="${g.id}">${esc(g.displayName)}</option>`).join("")}</select>`],
      ]);
    el.querySelector("#newsku")!.addEventListener("submit", act(() => {
      const v = values("newsku");
      return api("POST", "/v1.0/subscribedSkus", { skuPartNumber: v.part, prepaidUnits: { enabled: +v.seats }, vCpuCount: +v.vcpu, ramInGB: +v.ram, storageInGB: +v.disk });
    }));
    el.querySelectorAll<HTMLSelectElement>("select[data-sku]").forEach((s) => s.addEventListener("change", act(() =>
      api("POST", `/v1.0/groups/${s.value}/assignLicense`, { addLicenses: [{ skuId: s.dataset.sku }], removeLicenses: [] }))));
  },
  async images(el) {
    const [gallery, custom] = await Promise.all([list(`${VE}/galleryImages`), list(`${VE}/deviceImages`)]);
    const formats = `<select name="format" title="File format"><option value="qcow2">qcow2</option><option value="raw">raw disk</option></select>`;
    // Each version but the only one gets a delete button; the server says why when it refuses.
    const versions = (i: any) => (i.versions ?? []).map((v: any) =>
      `${esc(v.version)}: ${esc(v.status)}${v.checkStep ? ` (${esc(v.checkStep)})` : ""}${v.errorCode ? ` (${esc(v.errorCode)}: ${esc(v.statusDetails)})` : ""}` +
      (i.versions.length > 1 && v.status !== "pending"
        ? ` <button class="secondary write small" data-delver="${esc(i.id)}" data-version="${esc(v.version)}" title="Delete version ${esc(v.version)}">×</button>` : "")).join("<br>");
    el.innerHTML = `<h2>Gallery</h2>` + table(gallery, [["Image", (i) => esc(i.displayName)], ["Id", (i) => esc(i.id)], ["Status", (i) => esc(i.status)], ["GB", (i) => esc(i.sizeInGb)],
      ["", (i) => `<button class="secondary write" data-delgal="${esc(i.id)}">Delete</button>`]]) +
      `<h2>Custom images</h2>` +
      form("upimg", `<input name="name" placeholder="Name" required><input name="version" placeholder="1.0.0" required>
        <input name="file" type="file" accept=".qcow2,.img,.raw" required>${formats}`, "Upload") +
      `<div id="upprogress" role="status"></div>` +
      form("newimg", `<input name="name" placeholder="Name" required><input name="version" placeholder="1.0.0" required>
        <input name="path" placeholder="/path/on/server/image.qcow2" required>${formats}`, "Register a server file") +
      table(custom, [["Image", (i) => esc(i.displayName)], ["Current", (i) => esc(i.version)], ["Status", (i) => `${esc(i.status)} ${esc(i.errorCode)}`],
        ["OS", (i) => `${esc(i.operatingSystem)} ${esc(i.osBuildNumber)}`], ["Versions", versions],
        ["", (i) => `<form class="write" data-newver="${i.id}" style="display:inline"><input name="version" placeholder="next version" size="9" required><input name="file" type="file" accept=".qcow2,.img,.raw" required>${formats}<button>Add version</button></form>
          <button class="secondary write" data-delimg="${i.id}">Delete</button>`]]);
    // While a check runs, redraw every 2 s to show its step; while the admin is filling a form,
    // look again later instead of throwing their input away.
    if (custom.some((i) => (i.versions ?? []).some((v: any) => v.status === "pending"))) {
      const redraw = () => {
        if (tab !== "images" || !document.body.contains(el)) return;
        const typing = el.contains(document.activeElement) && document.activeElement !== document.body ||
          [...el.querySelectorAll<HTMLInputElement>("input")].some((x) => x.value !== "");
        if (typing) window.setTimeout(redraw, 2000);
        else render();
      };
      window.setTimeout(redraw, 2000);
    }
    el.querySelector("#upimg")!.addEventListener("submit", act(() => {
      const f = el.querySelector<HTMLFormElement>("#upimg")!;
      const v = values("upimg");
      const file = (f.elements.namedItem("file") as HTMLInputElement).files![0];
      return upload(`${VE}/deviceImages/upload?displayName=${encodeURIComponent(v.name)}&version=${encodeURIComponent(v.version)}&format=${encodeURIComponent(v.format)}`, file);
    }));
    el.querySelector("#newimg")!.addEventListener("submit", act(() => { const v = values("newimg"); return api("POST", `${VE}/deviceImages`, { displayName: v.name, version: v.version, sourceImageResourceId: v.path, sourceImageFormat: v.format }); }));
    el.querySelectorAll<HTMLFormElement>("form[data-newver]").forEach((f) => f.addEventListener("submit", act(() => {
      const version = (f.elements.namedItem("version") as HTMLInputElement).value;
      const format = (f.elements.namedItem("format") as HTMLSelectElement).value;
      const file = (f.elements.namedItem("file") as HTMLInputElement).files![0];
      return upload(`${VE}/deviceImages/${f.dataset.newver}/versions/upload?version=${encodeURIComponent(version)}&format=${encodeURIComponent(format)}`, file);
    })));
    // A gallery build takes a minute or more to make again: ask first.
    el.querySelectorAll<HTMLButtonElement>("button[data-delgal]").forEach((b) => b.addEventListener("click", act(async () => {
      if (confirm(`Delete the gallery image ${b.dataset.delgal} and its files?`)) await api("DELETE", `${VE}/galleryImages/${encodeURIComponent(b.dataset.delgal!)}`);
    })));
    el.querySelectorAll<HTMLButtonElement>("button[data-delver]").forEach((b) => b.addEventListener("click", act(() =>
      api("DELETE", `${VE}/deviceImages/${b.dataset.delver}/versions/${encodeURIComponent(b.dataset.version!)}`))));
    el.querySelectorAll<HTMLButtonElement>("button[data-delimg]").forEach((b) => b.addEventListener("click", act(() => api("DELETE", `${VE}/deviceImages/${b.dataset.delimg}`))));
  },
  async policies(el) {
    const [policies, groups, gallery, custom, conns] = await Promise.all([
      list(`${VE}/provisioningPolicies?$expand=assignments`), list("/v1.0/groups"), list(`${VE}/galleryImages`), list(`${VE}/deviceImages`),
      list(`${VE}/onPremisesConnections`),
    ]);
    // Only connections whose checks passed (or warned) may be used; the API says so too.
    const healthy = conns.filter((c) => c.healthCheckStatus === "passed" || c.healthCheckStatus === "warning");
    const connName = (id: string) => conns.find((c) => c.id === id)?.displayName ?? id;
    // Current builds first; older ones still usable; images whose files are gone cannot be picked.
    const usable = gallery.filter((i) => i.status !== "notSupported")
      .sort((a, b) => Number(a.status !== "supported") - Number(b.status !== "supported"));
    const images = [...usable.map((i) => ({ v: `gallery|${i.id}`, t: `${i.displayName} (gallery${i.status === "supported" ? "" : ", older build"})` })),
      ...custom.filter((i) => i.status === "ready").map((i) => ({ v: `custom|${i.id}`, t: `${i.displayName} ${i.version}` }))];
    const groupName = (id: string) => groups.find((g) => g.id === id)?.displayName ?? id;
    el.innerHTML = form("newpolicy", `<input name="name" placeholder="Policy name" required>
        <select name="image" required>${images.map((i) => `<option value="${esc(i.v)}">${esc(i.t)}</option>`).join("")}</select>
        <select name="network" title="Network"><option value="">Hosted network</option>${healthy.map((c) => `<option value="${esc(c.id)}">${esc(c.displayName)} (${c.connectionType === "hybridAzureADJoin" ? "joins " + esc(c.adDomainName) : "no domain join"})</option>`).join("")}</select>
        <input name="template" placeholder="CPC-%USERNAME:4%-%RAND:5%"><label><input type="checkbox" name="admin"> Local admin</label>
        <input name="hibernate" type="number" min="1" max="10080" placeholder="Hibernate after (minutes idle)" title="Hibernate a Cloud PC whose console has been closed this many minutes; empty: never">
        <input name="pool" type="number" min="0" max="20" placeholder="Warm pool size" title="Booted, unassigned Cloud PCs kept ready per license with free seats, so new users get one in seconds">`, "Create policy") +
      table(policies, [
        ["Policy", (p) => esc(p.displayName)], ["Image", (p) => esc(p.imageDisplayName)],
        ["Network", (p) => (p.domainJoinConfigurations ?? []).map((d: any) => esc(d.onPremisesConnectionId ? connName(d.onPremisesConnectionId) : "Hosted network")).join("<br>") || "Hosted network"],
        ["Naming", (p) => esc(p.cloudPcNamingTemplate)],
        ["Hibernate", (p) => (p.hibernateAfterMinutes ? `after ${esc(p.hibernateAfterMinutes)} min idle` : "never")],
        ["Warm pool", (p) => (p.warmPoolSize ? `${esc(p.warmPoolSize)} per license` : "none")],
        ["Assigned groups (in order)", (p) => (p.assignments ?? []).map((a: any, i: number) => `${i + 1}. ${esc(groupName(a.target.groupId))}`).join("<br>")],
        ["", (p) => `<span class="write"><span class="order" data-policy="${p.id}">${groups.map((g) => `<label><input type="checkbox" value="${g.id}"> ${esc(g.displayName)}</label>`).join(" ")}</span>
          <button class="secondary" data-assign="${p.id}">Assign checked (in click order)</button> <button class="secondary" data-editp="${p.id}">Edit</button> <button class="secondary" data-delp="${p.id}">Delete</button></span>`],
      ]);
    el.querySelector("#newpolicy")!.addEventListener("submit", act(() => {
      const v = values("newpolicy");
      const [imageType, imageId] = v.image.split("|");
      const conn = conns.find((c) => c.id === v.network);
      const network = conn ? { domainJoinConfigurations: [{ domainJoinType: conn.connectionType, onPremisesConnectionId: conn.id }] } : {};
      return api("POST", `${VE}/provisioningPolicies`, {
        displayName: v.name, imageId, imageType, localAdminEnabled: v.admin === "on", ...network,
        ...(v.template ? { cloudPcNamingTemplate: v.template } : {}), ...(v.hibernate ? { hibernateAfterMinutes: +v.hibernate } : {}),
        ...(v.pool ? { warmPoolSize: +v.pool } : {}),
      });
    }));
    // The order in which boxes are ticked is the assignment order.
    const order = new Map<string, string[]>();
    el.querySelectorAll<HTMLElement>(".order").forEach((span) => span.querySelectorAll<HTMLInputElement>("input").forEach((box) =>
      box.addEventListener("change", () => {
        const list = (order.get(span.dataset.policy!) ?? []).filter((g) => g !== box.value);
        if (box.checked) list.push(box.value);
        order.set(span.dataset.policy!, list);
      })));
    el.querySelectorAll<HTMLButtonElement>("button[data-assign]").forEach((b) => b.addEventListener("click", act(() =>
      api("POST", `${VE}/provisioningPolicies/${b.dataset.assign}/assign`, {
        assignments: (order.get(b.dataset.assign!) ?? []).map((groupId) => ({ target: { "@odata.type": "#microsoft.graph.cloudPcManagementGroupAssignmentTarget", groupId } })),
      }))));
    // Editing changes the policy only: Cloud PCs made from it stay as they are until reprovisioned.
    el.querySelectorAll<HTMLButtonElement>("button[data-editp]").forEach((b) => b.addEventListener("click", act(async () => {
      const p = policies.find((x) => x.id === b.dataset.editp);
      const displayName = prompt("Policy name", p.displayName);
      if (displayName === null) return;
      const template = prompt("Naming template (empty for the default)", p.cloudPcNamingTemplate ?? "");
      if (template === null) return;
      await api("PATCH", `${VE}/provisioningPolicies/${p.id}`, { displayName, cloudPcNamingTemplate: template });
    })));
    el.querySelectorAll<HTMLButtonElement>("button[data-delp]").forEach((b) => b.addEventListener("click", act(() => api("DELETE", `${VE}/provisioningPolicies/${b.dataset.delp}`))));
  },
  async networks(el) {
    const conns = await list(`${VE}/onPremisesConnections`);
    const NC = `${VE}/onPremisesConnections`;
    el.innerHTML = form("newconn", `<input name="name" placeholder="Name" required>
        <select name="type" title="Join type"><option value="hybridAzureADJoin">Join an Active Directory domain</option><option value="azureADJoin">No domain join</option></select>
        <input name="bridge" placeholder="Host bridge (br-corp)" required pattern="[A-Za-z0-9_.-]+">
        <input name="vlan" type="number" min="1" max="4094" placeholder="VLAN (optional)">
        <input name="domain" placeholder="Domain (corp.contoso.com)"><input name="ou" placeholder="OU=CloudPCs,DC=corp,…">
        <input name="username" placeholder="Join account"><input name="password" type="password" placeholder="Join password" autocomplete="new-password">`,
      "Add connection") +
      table(conns, [
        ["Name", (c) => esc(c.displayName)],
        ["Type", (c) => esc(c.connectionType === "hybridAzureADJoin" ? "domain join" : "no domain join")],
        ["Network", (c) => `${esc(c.bridgeName)}${c.vlanId ? ` VLAN ${esc(c.vlanId)}` : ""} (${esc(c.regionName)})`],
        ["Domain", (c) => c.adDomainName ? `${esc(c.adDomainName)}<br>${esc(c.organizationalUnit)}<br>as ${esc(c.adDomainUsername)}` : ""],
        ["Health", (c) => `<span class="pill health" data-status="${esc(c.healthCheckStatus)}">${esc(c.healthCheckStatus)}</span>`],
        ["In use", (c) => (c.inUse ? "yes" : "no")],
        ["", (c) => `<button class="secondary" data-checks="${c.id}">Results</button> <button class="secondary write" data-run="${c.id}">Run checks</button>
          <button class="secondary write" data-delconn="${c.id}">Delete</button>`],
      ]) + `<div id="checks"></div>`;
    const show = (id: string) => {
      const c = conns.find((x) => x.id === id);
      const d = c?.healthCheckStatusDetail;
      el.querySelector("#checks")!.innerHTML = `<h2>Health checks of ${esc(c?.displayName)}</h2>` + (d
        ? `<p>Run from ${esc(d.startDateTime)} to ${esc(d.endDateTime ?? "(running)")}</p>` + table(d.healthChecks ?? [], [
          ["Check", (k) => esc(k.displayName)], ["Host", (k) => esc(k.hostName)],
          ["Status", (k) => `<span class="pill" data-status="${esc(k.status)}">${esc(k.status)}</span>`],
          ["ms", (k) => esc(new Date(k.endDateTime).getTime() - new Date(k.startDateTime).getTime())],
          ["Found", (k) => esc(k.additionalDetails)], ["Remedy", (k) => esc(k.recommendedAction ?? "")],
        ])
        : "<p>No checks have run yet.</p>");
    };
    el.querySelectorAll<HTMLButtonElement>("button[data-checks]").forEach((b) => b.addEventListener("click", () => show(b.dataset.checks!)));
    el.querySelector("#newconn")!.addEventListener("submit", act(() => {
      const v = values("newconn");
      const joins = v.type === "hybridAzureADJoin";
      return api("POST", NC, {
        displayName: v.name, connectionType: v.type, bridgeName: v.bridge, ...(v.vlan ? { vlanId: +v.vlan } : {}),
        ...(joins ? { adDomainName: v.domain, organizationalUnit: v.ou, adDomainUsername: v.username, adDomainPassword: v.password } : {}),
      });
    }));
    el.querySelectorAll<HTMLButtonElement>("button[data-run]").forEach((b) => b.addEventListener("click", act(() => api("POST", `${NC}/${b.dataset.run}/runHealthChecks`, {}))));
    el.querySelectorAll<HTMLButtonElement>("button[data-delconn]").forEach((b) => b.addEventListener("click", act(() => api("DELETE", `${NC}/${b.dataset.delconn}`))));
    // Checks take seconds: redraw until none is pending or running, unless the admin is typing.
    if (conns.some((c) => c.healthCheckStatus === "pending" || c.healthCheckStatus === "running")) {
      const redraw = () => {
        if (tab !== "networks" || !document.body.contains(el)) return;
        const typing = [...el.querySelectorAll<HTMLInputElement>("input")].some((x) => x.value !== "");
        if (typing) window.setTimeout(redraw, 1000);
        else render();
      };
      window.setTimeout(redraw, 1000);
    }
  },
  async hosts(el) {
    const hosts = await list("/cloudpc/hosts");
    const used = (h: any) => `${h.used.vCpuCount}/${h.capacity.vCpuCount} vCPU, ${h.used.memoryInMB}/${h.capacity.memoryInMB} MB, ${h.used.diskInGB}/${h.capacity.diskInGB} GB`;
    el.innerHTML = form("jointoken", `<input name="region" placeholder="Region of the new host" required pattern="[a-z0-9-]+">`, "Create join token") +
      `<p id="jointokenout" class="secret"></p>` +
      table(hosts, [
        ["Name", (h) => esc(h.displayName)], ["Region", (h) => esc(h.region)],
        ["State", (h) => `<span class="state">${esc(h.state)}</span>`], ["Accelerator", (h) => esc(h.accelerator)],
        ["Cloud PCs", (h) => esc(h.cloudPcCount) + (h.savedCloudPcCount ? ` (${esc(h.savedCloudPcCount)} hibernated)` : "")], ["Used / capacity", (h) => esc(used(h))],
        ["Last report", (h) => esc(h.lastHeartbeatDateTime ?? "never")], ["Detail", (h) => esc(h.statusDetail ?? "")],
        ["", (h) => (h.state === "unreachable"
          ? `<button class="secondary write" data-evacuate="${h.id}">Evacuate</button>`
          : ["ready", "maintenance", "draining"].filter((s) => s !== h.state)
            .map((s) => `<button class="secondary write" data-host="${h.id}" data-state="${s}">${s === "ready" ? "Ready" : s === "maintenance" ? "Maintenance" : "Drain"}</button>`).join(" "))],
      ]);
    el.querySelector("#jointoken")!.addEventListener("submit", async (e) => {
      e.preventDefault();
      try {
        const t = await api("POST", "/cloudpc/hosts/joinTokens", { region: values("jointoken").region });
        await render();
        // Shown once: on the new host, cloudpc host-agent --join <this URL> --token <token>.
        app.querySelector("#jointokenout")!.textContent =
          `Join token for region ${t.region}, valid once until ${t.expirationDateTime}: ${t.token} — on the new host run: cloudpc host-agent --join ${location.origin} --token ${t.token}`;
      } catch (err: any) {
        app.querySelector("#err")!.textContent = err.message;
      }
    });
    el.querySelectorAll<HTMLButtonElement>("button[data-host]").forEach((b) => b.addEventListener("click",
      act(() => api("PATCH", `/cloudpc/hosts/${b.dataset.host}`, { state: b.dataset.state }))));
    // The API says how many Cloud PCs lose their data; the admin confirms after reading it.
    el.querySelectorAll<HTMLButtonElement>("button[data-evacuate]").forEach((b) => b.addEventListener("click", act(async () => {
      try {
        await api("POST", `/cloudpc/hosts/${b.dataset.evacuate}/evacuate`, {});
      } catch (err: any) {
        if (!confirm(`${err.message}.\n\nEvacuate anyway?`)) return;
        await api("POST", `/cloudpc/hosts/${b.dataset.evacuate}/evacuate`, { confirmDataLoss: true });
      }
    })));
  },
  async identity(el) {
    const providers = await list("/cloudpc/identityProviders");
    const csv = (v: unknown) => String(v ?? "").split(",").map((x) => x.trim()).filter((x) => x);
    el.innerHTML = form("idp", `<input name="displayName" placeholder="Name (Sign in with …)" required>
        <input name="issuer" placeholder="Issuer URL" required type="url">
        <input name="clientId" placeholder="Client id" required>
        <input name="clientSecret" placeholder="Client secret" type="password">
        <input name="administratorGroups" placeholder="Administrator groups (comma-separated)">
        <input name="readerGroups" placeholder="Reader groups (comma-separated)">`, "Connect provider") +
      `<p id="scimout" class="secret"></p>` +
      table(providers, [
        ["Name", (p) => esc(p.displayName)], ["Issuer", (p) => esc(p.issuer)], ["Client", (p) => esc(p.clientId)],
        ["Administrators", (p) => esc(p.administratorGroups.join(", "))], ["Readers", (p) => esc(p.readerGroups.join(", "))],
        ["SCIM", (p) => (p.hasScimToken ? "token issued" : "no token")],
        ["", (p) => `<button class="secondary write" data-scim="${p.id}">New SCIM token</button> <button class="secondary write" data-delidp="${p.id}">Remove</button>`],
      ]);
    el.querySelector("#idp")!.addEventListener("submit", act(async () => {
      const v = values("idp");
      await api("POST", "/cloudpc/identityProviders", {
        displayName: v.displayName, issuer: v.issuer, clientId: v.clientId,
        ...(v.clientSecret ? { clientSecret: v.clientSecret } : {}),
        administratorGroups: csv(v.administratorGroups), readerGroups: csv(v.readerGroups),
      });
    }));
    el.querySelectorAll<HTMLButtonElement>("button[data-scim]").forEach((b) => b.addEventListener("click", async () => {
      try {
        const t = await api("POST", `/cloudpc/identityProviders/${b.dataset.scim}/scimToken`);
        await render();
        // Shown once: the provider's provisioning settings take the URL and the token.
        app.querySelector("#scimout")!.textContent = `SCIM tenant URL ${t.scimBaseUrl}, secret token (shown only now): ${t.secret}`;
      } catch (err: any) {
        app.querySelector("#err")!.textContent = err.message;
      }
    }));
    el.querySelectorAll<HTMLButtonElement>("button[data-delidp]").forEach((b) => b.addEventListener("click",
      act(() => api("DELETE", `/cloudpc/identityProviders/${b.dataset.delidp}`))));
  },
  async tokens(el) {
    if (!isAdmin) {
      el.textContent = "Only a Cloud PC Administrator sees and manages API tokens.";
      return;
    }
    const tokens = await list("/cloudpc/tokens");
    el.innerHTML = form("newtoken", `<input name="name" placeholder="Token name" required>
        <select name="role"><option value="cloudPcReader">Reader</option><option value="cloudPcAdministrator">Administrator</option></select>
        <input name="days" type="number" min="1" max="3650" placeholder="Expires in days (empty: never)">`, "Create token") +
      `<p id="secret" class="secret"></p>` +
      table(tokens, [
        ["Name", (t) => esc(t.displayName)], ["Role", (t) => esc(t.role)], ["Created", (t) => esc(t.createdDateTime)],
        ["Expires", (t) => esc(t.expirationDateTime ?? "never")], ["Last used", (t) => esc(t.lastUsedDateTime ?? "")],
        ["", (t) => `<button class="secondary write" data-revoke="${t.id}">Revoke</button>`],
      ]);
    el.querySelector("#newtoken")!.addEventListener("submit", async (e) => {
      e.preventDefault();
      const v = values("newtoken");
      const body: any = { displayName: v.name, role: v.role };
      if (v.days) body.expirationDateTime = new Date(Date.now() + Number(v.days) * 86400000).toISOString();
      try {
        const made = await api("POST", "/cloudpc/tokens", body);
        await render();
        // Shown once, after the redraw, and never again.
        app.querySelector("#secret")!.textContent = `Token '${made.displayName}' created. Its secret, shown only now: ${made.secret}`;
      } catch (err: any) {
        app.querySelector("#err")!.textContent = err.message;
      }
    });
    el.querySelectorAll<HTMLButtonElement>("button[data-revoke]").forEach((b) => b.addEventListener("click", act(() => api("DELETE", `/cloudpc/tokens/${b.dataset.revoke}`))));
  },
  async audit(el) {
    const events = (await list(`${VE}/auditEvents`)).reverse();
    el.innerHTML = table(events, [
      ["When", (e) => esc(e.activityDateTime)], ["Activity", (e) => esc(e.activity)],
      ["By", (e) => esc(e.actor.userPrincipalName ?? e.actor.applicationDisplayName)], ["Resource", (e) => esc(e.resources[0]?.displayName)],
      ["Changes", (e) => (e.resources[0]?.modifiedProperties ?? []).map((m: any) => `${esc(m.displayName)}: ${esc(m.oldValue)} → ${esc(m.newValue)}`).join("<br>")],
    ]);
  },
};

if (token) start().catch(() => showSignIn()); else showSignIn((window as any).signInError);
