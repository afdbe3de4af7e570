// A real OpenID provider (panva/oidc-provider) for the gateway's identity tests.
// Usage: node server.mjs PORT KEYS.json AUDIENCE
// Two client_credentials clients get RFC 9068 JWT access tokens for AUDIENCE, with a "roles"
// claim. Keys come from KEYS.json (a private JWK Set; the first key of an algorithm signs), so a
// restart with a new set is a key rotation.
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const [port, keysFile, audience] = process.argv.slice(2);
const roles = { 'svc-reader': ['reader'], 'svc-ops': ['ops'] };

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: Object.keys(roles).map((id) => ({
    client_id: id,
    client_secret: `${id}-secret-0123456789abcdef`,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    id_token_signed_response_alg: 'ES256',
  })),
  jwks: JSON.parse(readFileSync(keysFile, 'utf8')),
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => audience,
      getResourceServerInfo: () => ({
        scope: 'models',
        audience,
        accessTokenFormat: 'jwt',
        accessTokenTTL: 300,
        jwt: { sign: { alg: 'ES256' } },
      }),
    },
  },
  extraTokenClaims: (_ctx, token) => ({ roles: roles[token.clientId] ?? [] }),
});
provider.listen(Number(port), '127.0.0.1', () => console.log(`ready on ${port}`));
