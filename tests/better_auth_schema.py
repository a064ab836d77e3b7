"""better-auth's own tables, as its Kysely migration (``npx @better-auth/cli migrate``) writes them for PostgreSQL:
the one copy of that DDL, for the import tests (test_import.py) and the benches that import keys (bench/run.py,
bench/import_bench.py). Plain constants: importing them pulls in no test machinery."""

BETTER_AUTH_CORE = """
create table "user" ("id" text not null primary key, "name" text not null, "email" text not null unique,
  "emailVerified" boolean not null, "image" text, "createdAt" timestamptz default CURRENT_TIMESTAMP not null,
  "updatedAt" timestamptz default CURRENT_TIMESTAMP not null);
create table "session" ("id" text not null primary key, "expiresAt" timestamptz not null,
  "token" text not null unique, "createdAt" timestamptz default CURRENT_TIMESTAMP not null,
  "updatedAt" timestamptz not null, "ipAddress" text, "userAgent" text,
  "userId" text not null references "user" ("id") on delete cascade);
create index "session_userId_idx" on "session" ("userId");
"""

# better-auth >= 1.5: the owner is "referenceId" (a user or an organization), "configId" names the key config.
APIKEY_1_5 = """
create table "apikey" ("id" text not null primary key, "configId" text not null, "name" text, "start" text,
  "referenceId" text not null, "prefix" text, "key" text not null, "refillInterval" integer,
  "refillAmount" integer, "lastRefillAt" timestamptz, "enabled" boolean, "rateLimitEnabled" boolean,
  "rateLimitTimeWindow" integer, "rateLimitMax" integer, "requestCount" integer, "remaining" integer,
  "lastRequest" timestamptz, "expiresAt" timestamptz, "createdAt" timestamptz not null,
  "updatedAt" timestamptz not null, "permissions" text, "metadata" text);
create index "apikey_configId_idx" on "apikey" ("configId");
create index "apikey_referenceId_idx" on "apikey" ("referenceId");
create index "apikey_key_idx" on "apikey" ("key");
"""

# better-auth 1.4: the owner is "userId", a foreign key to "user"; no "configId".
APIKEY_1_4 = """
create table "apikey" ("id" text not null primary key, "name" text, "start" text, "prefix" text,
  "key" text not null, "userId" text not null references "user" ("id") on delete cascade,
  "refillInterval" integer, "refillAmount" integer, "lastRefillAt" timestamptz, "enabled" boolean,
  "rateLimitEnabled" boolean, "rateLimitTimeWindow" integer, "rateLimitMax" integer, "requestCount" integer,
  "remaining" integer, "lastRequest" timestamptz, "expiresAt" timestamptz, "createdAt" timestamptz not null,
  "updatedAt" timestamptz not null, "permissions" text, "metadata" text);
create index "apikey_key_idx" on "apikey" ("key");
create index "apikey_userId_idx" on "apikey" ("userId");
"""
