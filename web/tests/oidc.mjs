// Browser test of signing in through the organisation's identity provider (a real oidc-provider
// run by the Rust test): each step is a fresh browser that clicks "Sign in with <provider>" on
// the portal or the admin console, logs in at the provider's own form, and lands back signed in.
// Env: CLOUDPC_URL, PROVIDER, SCREENSHOT, and STEPS: a JSON list of
//   {"page": "portal"|"console", "login": "<account at the provider>", "expect": "<text shown after>",
//    "absent": "<text that must not be shown>" (optional), "identityPage": true (optional: check the
//    console's Identity providers page), "thenDeactivate"/"afterwards" (optional: deactivate the user
//    through SCIM, then the reloaded page must show "afterwards")}.
import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = process.env;
const fail = (m) => {
  console.error(`oidc test: ${m}`);
  process.exit(1);
};
const launch = () =>
  chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "cloudpc-chromium-")), {
    executablePath: env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1200, height: 800 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });

for (const [i, step] of JSON.parse(env.STEPS).entries()) {
  const ctx = await launch();
  try {
    const page = ctx.pages()[0] ?? (await ctx.newPage());
    await page.goto(`${env.CLOUDPC_URL}${step.page === "console" ? "/admin.html" : "/"}`);
    const button = page.locator(`a.provider:text-is("Sign in with ${env.PROVIDER}")`);
    await button.waitFor({ timeout: 10000 }).catch(() => fail(`step ${i}: no "Sign in with ${env.PROVIDER}" on the ${step.page}`));
    await button.click();
    // The provider's own login form (oidc-provider's development interaction).
    await page.waitForSelector("input[name=login]", { timeout: 10000 }).catch(() => fail(`step ${i}: the provider's login form did not show`));
    await page.fill("input[name=login]", step.login);
    await page.fill("input[name=password]", "any");
    await page.click("button[type=submit]");
    await page.waitForURL((u) => u.toString().startsWith(env.CLOUDPC_URL), { timeout: 15000 })
      .catch(() => fail(`step ${i}: not sent back to cloudpc (at ${page.url()})`));
    await page.getByText(step.expect).first().waitFor({ timeout: 15000 })
      .catch(async () => fail(`step ${i}: "${step.expect}" not shown; the page says: ${(await page.textContent("body"))?.slice(0, 500)}`));
    if (step.absent && (await page.getByText(step.absent).count()) > 0) fail(`step ${i}: "${step.absent}" is shown`);
    if (page.url().includes("token=")) fail(`step ${i}: the console token stayed in the address bar`);
    if (step.identityPage) {
      // The console's Identity providers page lists the provider and issues a SCIM token.
      await page.click("nav button[data-tab=identity]");
      await page.waitForSelector(`td:text-is("${env.PROVIDER}")`, { timeout: 10000 }).catch(() => fail(`step ${i}: the provider is not listed`));
      await page.click("button[data-scim]");
      await page.getByText("SCIM tenant URL").waitFor({ timeout: 10000 }).catch(() => fail(`step ${i}: no SCIM token shown`));
      console.log(`step ${i}: identity providers page lists ${env.PROVIDER} and issued a SCIM token`);
    }
    if (step.signOut) {
      // Sign-out revokes the token this sign-in gave the console.
      const token = await page.evaluate(() => sessionStorage.getItem("cloudpc-token"));
      await page.click("#out");
      await page.locator("input[name=token]").waitFor({ timeout: 10000 }).catch(() => fail(`step ${i}: sign-out did not show the sign-in form`));
      let status = 0;
      for (let k = 0; k < 20 && status !== 401; k++) {
        status = (await fetch(`${env.CLOUDPC_URL}/v1.0/users`, { headers: { authorization: `Bearer ${token}` } })).status;
        if (status !== 401) await new Promise((r) => setTimeout(r, 100));
      }
      if (status !== 401) fail(`step ${i}: the signed-out token still works (${status})`);
      console.log(`step ${i}: signed out; the console's token is revoked`);
    }
    if (step.thenDeactivate) {
      // The provider deactivates the signed-in user through SCIM; the open portal loses access.
      const r = await fetch(step.thenDeactivate.scimUrl, {
        method: "PATCH",
        headers: { authorization: `Bearer ${step.thenDeactivate.token}`, "content-type": "application/scim+json" },
        body: JSON.stringify({ schemas: ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
          Operations: [{ op: "Replace", path: "active", value: "False" }] }),
      });
      if (!r.ok) fail(`step ${i}: the SCIM deactivation answered ${r.status}`);
      await page.reload();
      await page.getByText(step.afterwards).first().waitFor({ timeout: 15000 })
        .catch(async () => fail(`step ${i}: after deactivation "${step.afterwards}" not shown: ${(await page.textContent("body"))?.slice(0, 300)}`));
      console.log(`step ${i}: deactivated; the portal shows "${step.afterwards}"`);
    }
    await page.screenshot({ path: env.SCREENSHOT });
    console.log(`step ${i}: ${step.page} as ${step.login}: "${step.expect}" shown`);
  } finally {
    await ctx.close();
  }
}
