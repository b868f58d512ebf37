// A real OpenID Connect provider for cloudpc's tests: the certified `oidc-provider` package,
// with test accounts that carry a groups claim. Each start makes a fresh RSA signing key and
// writes its private half (PEM) and key id to IDP_KEY_OUT, so a test can also mint tokens the
// provider could have issued (expired, wrong audience) and can rotate keys by restarting it.
//
// Settings (environment): IDP_PORT, IDP_KEY_OUT, IDP_CLIENT_ID, IDP_CLIENT_SECRET,
// IDP_REDIRECT_URIS (comma-separated), IDP_ACCOUNTS (JSON: {"login": {"upn": "...", "groups": [...]}}).
// Sign-in uses the provider's own development login form: any password, the login names the account.
import crypto from "node:crypto";
import fs from "node:fs";
import Provider from "oidc-provider";

const port = Number(process.env.IDP_PORT);
const accounts = JSON.parse(process.env.IDP_ACCOUNTS ?? "{}");
const { privateKey } = crypto.generateKeyPairSync("rsa", { modulusLength: 2048 });
const kid = crypto.randomUUID();
const jwk = { ...privateKey.export({ format: "jwk" }), kid, alg: "RS256", use: "sig" };
fs.writeFileSync(process.env.IDP_KEY_OUT, JSON.stringify({ kid, pem: privateKey.export({ format: "pem", type: "pkcs8" }) }));

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [{
    client_id: process.env.IDP_CLIENT_ID,
    client_secret: process.env.IDP_CLIENT_SECRET,
    redirect_uris: (process.env.IDP_REDIRECT_URIS ?? "").split(","),
    grant_types: ["authorization_code"],
    response_types: ["code"],
  }],
  jwks: { keys: [jwk] },
  scopes: ["openid", "profile", "groups"],
  claims: { openid: ["sub"], profile: ["preferred_username", "name"], groups: ["groups"] },
  // The claims of the asked scopes go into the ID token itself, where cloudpc reads them.
  conformIdTokenClaims: false,
  pkce: { required: () => true, methods: ["S256"] },
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ["cloudpc-test-idp"] },
  async findAccount(_ctx, id) {
    const a = accounts[id];
    if (!a) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: a.upn, name: a.upn, groups: a.groups ?? [] };
      },
    };
  },
  // Consent is implied: the test client is first-party.
  async loadExistingGrant(ctx) {
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope("openid profile groups");
    grant.addOIDCClaims(["preferred_username", "name", "groups"]);
    await grant.save();
    return grant;
  },
});
provider.proxy = false;
provider.listen(port, "127.0.0.1", () => console.log(`idp listening on ${port} kid ${kid}`));
