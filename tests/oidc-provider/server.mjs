// A real OpenID provider for sidecar's tests (tests/test_oidc_provider.py):
// node oidc-provider, written independently of sidecar and its mock cloud.
//
//   node tests/oidc-provider/server.mjs PORT      (or OIDC_PROVIDER_PORT=PORT)
//
// Listens on 127.0.0.1:PORT with issuer http://127.0.0.1:PORT and prints
// "ready <issuer>" on stdout once it accepts connections.  Its plain-HTML
// development login and consent pages (devInteractions) take any login and
// password; the account is always the fixed one below.
import { Provider } from 'oidc-provider';

const port = Number(process.argv[2] ?? process.env.OIDC_PROVIDER_PORT);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('usage: node server.mjs PORT (or OIDC_PROVIDER_PORT=PORT)');
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}`;
// Short-lived access tokens (the tests rotate with `sidecar token --force-refresh`, never by waiting).
const accessTtl = Number(process.env.OIDC_PROVIDER_ACCESS_TTL ?? 10);

export const ACCOUNT = { sub: 'alice', name: 'Alice Example', email: 'alice@example.test', email_verified: true };
export const PUBLIC_CLIENT = 'sidecar-cli';
export const RESOURCE_SERVER = { id: 'resource-server', secret: 'resource-server-secret' };

const configuration = {
  clients: [
    {
      // sidecar: a native public client; PKCE is required of it (oidc-provider's default for public clients).
      client_id: PUBLIC_CLIENT,
      client_name: 'sidecar tests',
      application_type: 'native', // RFC 8252 §7.3: any port on a loopback redirect URI
      token_endpoint_auth_method: 'none',
      redirect_uris: ['http://127.0.0.1/callback'],
      response_types: ['code'],
      grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
    },
    {
      // The tests' resource server: introspects the bearer tokens it is sent.
      client_id: RESOURCE_SERVER.id,
      client_secret: RESOURCE_SERVER.secret,
      token_endpoint_auth_method: 'client_secret_basic',
      redirect_uris: [],
      response_types: [],
      grant_types: [],
    },
  ],
  async findAccount(_ctx, id) {
    // The devInteractions login page accepts any login; every login is this one account.
    return {
      accountId: id,
      async claims() {
        return { ...ACCOUNT, sub: id };
      },
    };
  },
  claims: {
    openid: ['sub'],
    profile: ['name'],
    email: ['email', 'email_verified'],
  },
  scopes: ['openid', 'offline_access', 'profile', 'email'],
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    userinfo: { enabled: true },
  },
  // A refresh token is spent when used; reusing a spent one revokes the whole grant.
  rotateRefreshToken: true,
  async issueRefreshToken(_ctx, client, code) {
    // offline_access survives only with prompt=consent (OIDC Core §11), which the provider enforces.
    return client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access');
  },
  ttl: {
    AccessToken: accessTtl,
    AuthorizationCode: 60,
    DeviceCode: 120,
    Grant: 3600,
    Interaction: 600,
    RefreshToken: 3600,
    Session: 3600,
    IdToken: 3600,
  },
  cookies: { keys: ['sidecar-tests-only-cookie-key'] },
};

const provider = new Provider(issuer, configuration);
provider.proxy = false;

// RFC 8628 §3.2 lets the provider name the polling interval; oidc-provider
// leaves it out (clients then wait 5 s).  The tests' provider asks for 1 s so
// the device login test does not wait; nothing else about the answer changes.
provider.use(async (ctx, next) => {
  await next();
  if (ctx.method === 'POST' && ctx.path === '/device/auth' && ctx.status === 200 && ctx.body?.device_code) {
    ctx.body = { ...ctx.body, interval: 1 };
  }
});

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});

function stop() {
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
