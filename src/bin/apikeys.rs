//! `apikeys`: the operator's command-line tool. Thin: it parses arguments and calls the library.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use apikeys::audit::{Actor, AuditPage};
use apikeys::http::{
    AppOptions, Credential, DashboardOptions, GitHubKeys, LeakOptions, ServeOptions, dashboard_router,
};
use apikeys::leak::{KeyState, ScanEvent, Scanner};
use apikeys::webhook::{DeadDelivery, Endpoint, EndpointName, HttpTransport, WebhookOptions, WebhookSecret};
use apikeys::{
    AccountId, AccountListing, ApiKey, CreatedKey, Credits, Environment, KeyFormat, KeyId, KeyName, KeyService,
    KeyUpdate, Maintenance, MemoryStore, Meta, NewKey, OwnerId, OwnerLimits, OwnerUpdate, Pepper, PostgresOptions,
    PostgresStore, RateLimit, RateLimits, RedbStore, Refill, RefillInterval, Scopes, SqliteStore, ValidationError,
};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use serde_json::json;

/// Issue, list, verify and revoke API keys.
#[derive(Parser)]
#[command(
    name = "apikeys",
    version,
    after_help = "Secrets come only from the environment, never from arguments:\n  \
                  APIKEYS_PEPPER       a pepper (32 bytes or more) to digest keys with HMAC-SHA256\n  \
                  APIKEYS_PEPPER_FILE  a file holding the pepper\n  \
                  APIKEYS_SERVICE_TOKEN       `serve`: the credential of POST /keys/verify (32 bytes or more)\n  \
                  APIKEYS_SERVICE_TOKEN_FILE  a file holding it\n  \
                  APIKEYS_ADMIN_TOKEN         `serve`: the administrator's credential, which signs in to /dashboard\n  \
                  APIKEYS_ADMIN_TOKEN_FILE    a file holding it\n  \
                  APIKEYS_WEBHOOK_URL, APIKEYS_WEBHOOK_SECRET  a webhook endpoint, named \"default\"\n\
                  `verify` reads the key from standard input."
)]
struct Cli {
    #[command(flatten)]
    store: StoreArgs,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct StoreArgs {
    /// Where keys are stored.
    #[arg(long, value_enum, env = "APIKEYS_BACKEND", default_value_t = Backend::Sqlite, global = true)]
    backend: Backend,
    /// The database file [default: apikeys.db, or apikeys.redb with --backend redb].
    #[arg(long, env = "APIKEYS_DB", global = true)]
    db: Option<PathBuf>,
    /// With --backend postgres: the server, e.g. postgres://user@host:5432/db; one with a
    /// password only from APIKEYS_DATABASE_URL, as arguments show in the process list.
    #[arg(long, env = "APIKEYS_DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
    /// With --backend postgres: TLS to the server, as libpq's sslmode: disable, prefer (the
    /// default: TLS if offered, unchecked), require (unchecked), verify-ca, verify-full. Wins
    /// over the URL's sslmode.
    #[arg(long, env = "PGSSLMODE", global = true, value_name = "MODE")]
    database_sslmode: Option<apikeys::SslMode>,
    /// With --backend postgres: a PEM file of the CAs that vouch for the server [default: the
    /// URL's sslrootcert, else the system's CAs].
    #[arg(long, env = "PGSSLROOTCERT", global = true, value_name = "FILE")]
    database_sslrootcert: Option<PathBuf>,
    /// With --backend postgres: keep verified keys in memory for at most this long (e.g. 1s),
    /// dropped at once when any instance changes them (LISTEN/NOTIFY) [default: no cache].
    #[arg(long, env = "APIKEYS_CACHE_STALENESS", global = true, value_parser = humantime::parse_duration)]
    cache_staleness: Option<Duration>,
    /// With --backend postgres: the schema that holds the tables.
    #[arg(long, env = "APIKEYS_SCHEMA", default_value = "apikeys", global = true)]
    schema: String,
    /// The token namespace: tokens look like {namespace}_{environment}_v1_….
    #[arg(long, env = "APIKEYS_NAMESPACE", default_value = "as", global = true)]
    namespace: String,
    /// The token environment; keys of another environment are refused.
    #[arg(long, env = "APIKEYS_ENVIRONMENT", default_value = "live", global = true)]
    environment: String,
    /// With a pepper, also accept keys created before it (stored under plain SHA-256).
    #[arg(long, env = "APIKEYS_ACCEPT_UNPEPPERED_KEYS", global = true)]
    accept_unpeppered_keys: bool,
    /// How long any store call that waits may take before it fails (a 503 for `serve`); longer
    /// than the stores' own limits (5 s), so that those answer first with their own errors.
    #[arg(long, env = "APIKEYS_STORE_DEADLINE", global = true, value_parser = humantime::parse_duration, default_value = "10s")]
    store_deadline: Duration,
    /// How often `serve` exchanges rate-limit counts with the other instances on a shared store
    /// (PostgreSQL), so that a limit holds across them.
    #[arg(long, env = "APIKEYS_SHARE_RATE_LIMITS", global = true, value_parser = humantime::parse_duration, default_value = "200ms")]
    share_rate_limits: Duration,
    /// While the other instances' counts cannot be had, count this instance's uses alone
    /// instead of answering 503 to uses that check a rate limit.
    #[arg(long, env = "APIKEYS_RATE_LIMITS_FAIL_OPEN", global = true)]
    rate_limits_fail_open: bool,
    /// How long audit events are kept; `serve` deletes older ones every hour.
    #[arg(long, env = "APIKEYS_AUDIT_RETENTION", global = true, value_parser = humantime::parse_duration, default_value = "365days")]
    audit_retention: Duration,
    /// A JSON file of webhook endpoints: {"endpoints": [{"name", "url", "secret" or "secretEnv"}]}.
    /// Every change, by any command, writes a delivery for each; `serve` sends them.
    #[arg(long, env = "APIKEYS_WEBHOOKS", global = true, value_name = "FILE")]
    webhooks: Option<PathBuf>,
    /// How often `serve` looks for webhook deliveries when it found none the last time.
    #[arg(long, env = "APIKEYS_WEBHOOK_POLL", global = true, value_parser = humantime::parse_duration, default_value = "1s")]
    webhook_poll: Duration,
    /// How long `serve` waits for a webhook endpoint to answer before the attempt counts as failed.
    #[arg(long, env = "APIKEYS_WEBHOOK_TIMEOUT", global = true, value_parser = humantime::parse_duration, default_value = "10s")]
    webhook_timeout: Duration,
    /// How long `serve` holds the webhook deliveries it claims: if it dies, another instance (or
    /// itself, restarted) sends them this long after. At least 5 s more than the timeout.
    #[arg(long, env = "APIKEYS_WEBHOOK_LEASE", global = true, value_parser = humantime::parse_duration, default_value = "60s")]
    webhook_lease: Duration,
}

impl StoreArgs {
    /// The database file of a file backend: `--db`, or the backend's default.
    fn file(&self) -> Option<PathBuf> {
        let default = match self.backend {
            Backend::Sqlite => "apikeys.db",
            Backend::Redb => "apikeys.redb",
            Backend::Postgres | Backend::Memory => return None,
        };
        Some(self.db.clone().unwrap_or_else(|| default.into()))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// An SQLite file, shared safely by several processes (the server and this tool).
    Sqlite,
    /// A redb file, for one process at a time.
    Redb,
    /// A PostgreSQL database, shared by service instances on several machines.
    Postgres,
    /// Process memory: gone when the process ends.
    Memory,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API; on an empty store, first create a key for --account and print it once.
    Serve {
        /// The address to listen on.
        #[arg(long, env = "APIKEYS_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The account that gets the first key when the store holds none.
        #[arg(long, default_value = "default")]
        account: String,
        #[command(flatten)]
        limits: ServeLimits,
    },
    /// Create a key and print it once.
    Create {
        /// The account that owns the key.
        #[arg(long)]
        account: String,
        /// A label for the key.
        #[arg(long)]
        name: Option<String>,
        /// Expire the key after this long, e.g. 30d, 12h, 90min.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        /// A grant the key holds, e.g. orders:read, reports:* or *; repeat for more
        /// [default: *, every scope].
        #[arg(long = "scope", value_name = "GRANT")]
        scopes: Vec<String>,
        #[command(flatten)]
        usage: UsageArgs,
    },
    /// Roll a key as administrator: print a new key with the same name, scopes and expiry, and
    /// let the old one work only for the grace period (never longer than it would have).
    Roll {
        /// The account that owns the key.
        #[arg(long)]
        account: String,
        /// The key's id, ak_….
        id: String,
        /// How long the old key keeps working, e.g. 1d, 2h, 0s (at most 7 days).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Duration,
    },
    /// Change a key's name, meta, credits or rate limits as administrator; what is not named
    /// stays as it is.
    Update {
        /// The account that owns the key.
        #[arg(long)]
        account: String,
        /// The key's id, ak_….
        id: String,
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Show the limits an owner's keys share, or change them as administrator; what is not
    /// named stays as it is.
    Owner {
        /// The account the owner belongs to.
        #[arg(long)]
        account: String,
        /// The owner's id.
        owner: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List an account's active keys (never their secrets).
    List {
        /// The account whose keys to list.
        #[arg(long)]
        account: String,
        /// Only the keys of this owner.
        #[arg(long, value_name = "OWNER_ID")]
        owner: Option<String>,
    },
    /// Revoke a key at once, as administrator (any key of the account, including one in use).
    Revoke {
        /// The account that owns the key.
        #[arg(long)]
        account: String,
        /// The key's id, ak_….
        #[arg(required_unless_present = "owner", conflicts_with = "owner")]
        id: Option<String>,
        /// Revoke every active key of this owner instead.
        #[arg(long, value_name = "OWNER_ID")]
        owner: Option<String>,
    },
    /// Show an account's audit trail, newest first: every change to its keys and owners.
    Audit {
        /// The account whose trail to show.
        #[arg(long)]
        account: String,
        /// At most this many events (1 to 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Start after this place: the `nextCursor` a page gave.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show the webhook outbox: how many deliveries wait, and the dead ones (given up after 3
    /// days of failures), the most recent first.
    Webhooks {
        /// At most this many dead deliveries (1 to 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Find keys in files and directories (of the namespace, in any environment, told by their
    /// checksum): print file:line:column, the prefix and, if the store knows the key, its id and
    /// state; never the key. Exit 1 when one is found (whatever else failed), 2 when none is but a
    /// path could not be read, 0 when none is.
    Scan {
        /// Files and directories to scan; binary files are skipped.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Read a key from standard input and say whether it is valid: exit 0 valid, 1 rejected, 2 error.
    Verify {
        /// Refused: a key given as an argument ends up in shell history and the process list.
        #[arg(hide = true)]
        key: Option<String>,
    },
}

/// A failure: the message for stderr. Exit code 2.
struct Failure(String);

impl<E: std::error::Error> From<E> for Failure {
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self(message)
    }
}

fn main() -> ExitCode {
    let parsed = Cli::command().try_get_matches().and_then(|matches| {
        let cli = Cli::from_arg_matches(&matches)?;
        Ok((cli, matches.value_source("database_url") == Some(clap::parser::ValueSource::CommandLine)))
    });
    let cli = match parsed {
        Ok((cli, url_in_arguments))
            if url_in_arguments && cli.store.database_url.as_deref().is_some_and(has_password) =>
        {
            return fail(Failure(
                "--database-url holds a password, which the process list and shell history show: give it in \
                 APIKEYS_DATABASE_URL instead"
                    .into(),
            ));
        }
        Ok((cli, _)) => cli,
        Err(error) if error.use_stderr() => {
            // clap repeats unexpected arguments; a key pasted into one must not be printed.
            eprint!("{}", redact_tokens(&error.render().to_string()));
            return ExitCode::from(2);
        }
        Err(help_or_version) => {
            let _ = help_or_version.print();
            return ExitCode::SUCCESS;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(Failure::from(error)),
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(failure) => fail(failure),
    }
}

/// Whether a PostgreSQL connection string holds a password: in a URL's user part
/// (`postgres://user:password@host`) or its query (`?password=`), or as a `password=` setting.
fn has_password(url: &str) -> bool {
    match url.split_once("://") {
        Some((_, rest)) => {
            let authority = rest.split(['/', '?']).next().unwrap_or_default();
            let query = rest.split_once('?').map_or("", |(_, query)| query);
            let in_query = query.split('&').any(|pair| pair.to_ascii_lowercase().starts_with("password="));
            in_query || authority.rsplit_once('@').is_some_and(|(user, _)| user.contains(':'))
        }
        None => url.split_whitespace().any(|setting| setting.to_ascii_lowercase().starts_with("password")),
    }
}

fn fail(Failure(message): Failure) -> ExitCode {
    eprintln!("error: {}", redact_tokens(&message));
    ExitCode::from(2)
}

/// Replaces what follows the visible prefix of anything shaped like a token (`…_v1_` and base32)
/// with `[REDACTED]`.
fn redact_tokens(text: &str) -> String {
    let mut redacted = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("_v1_") {
        let (before, after) = rest.split_at(at + "_v1_".len());
        redacted.push_str(before);
        let secret_len = after.bytes().take_while(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(b)).count();
        if secret_len > 4 {
            redacted.push_str(&after[..4]);
            redacted.push_str("[REDACTED]");
        } else {
            redacted.push_str(&after[..secret_len]);
        }
        rest = &after[secret_len..];
    }
    redacted.push_str(rest);
    redacted
}

async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    if let Command::Verify { key: Some(_) } = cli.command {
        return Err(Failure(
            "verify reads the key from standard input, never from an argument (arguments end up in shell \
             history and the process list): echo \"$KEY\" | apikeys verify"
                .into(),
        ));
    }
    if let Command::Scan { paths } = &cli.command {
        return scan(&cli.store, paths, cli.json).await;
    }
    // Only serve and what sets things up (create, owner) make a store file that is not there:
    // any other command run in the wrong directory, or with a mistyped --db, would answer from a
    // new, empty store.
    if !matches!(cli.command, Command::Serve { .. } | Command::Create { .. } | Command::Owner { .. })
        && let Some(file) = cli.store.file().filter(|file| !file.exists())
    {
        return Err(Failure(format!(
            "no store at {}: give --db the store's file (serve, create and owner make a new one)",
            file.display()
        )));
    }
    let (service, store_is_empty) = open_service(&cli.store).await?;
    // What an operator changes here is the administrator's doing.
    let service = service.acting_as(Actor::admin("cli")?);
    let json = cli.json;
    let code = match cli.command {
        Command::Serve { listen, account, limits } => {
            let first_key_for = store_is_empty.then_some(AccountId::new(account)?);
            let verification = credential_from_environment("APIKEYS_SERVICE_TOKEN")?;
            let admin = credential_from_environment("APIKEYS_ADMIN_TOKEN")?;
            if admin.is_some() && admin == verification {
                // Not refused, but said: whoever may verify keys may then administer every account.
                eprintln!(
                    "warning: APIKEYS_ADMIN_TOKEN is APIKEYS_SERVICE_TOKEN: give the administrator a secret of its own"
                );
            }
            let app = limits.app_options(&service, verification, admin)?;
            let timing = (cli.store.webhook_poll, cli.store.webhook_timeout, cli.store.webhook_lease);
            let served = serve(service.clone(), listen, first_key_for, limits.options(), app, timing, json).await;
            if served.is_err() {
                // However serving ended, the last uses noted are written.
                let _ = service.flush().await;
            }
            served?
        }
        Command::Create { account, name, expires_in, scopes, usage } => {
            let expires_at = expires_in.map(expiry_after).transpose()?;
            let scopes = if scopes.is_empty() { None } else { Some(Scopes::new(scopes)?) };
            let mut new = usage.into_new_key()?;
            new.name = name.map(KeyName::new).transpose()?;
            new.expires_at = expires_at;
            new.scopes = scopes;
            let created = service.create(&AccountId::new(account)?, new).await?;
            print_created(&created, json);
            ExitCode::SUCCESS
        }
        Command::Roll { account, id, grace } => {
            let id: KeyId = id.parse()?;
            let rolled = service.roll_as_admin(&AccountId::new(account)?, &id, grace).await?;
            print_created(&rolled.key, json);
            let until = rfc3339(rolled.previous.expires_at);
            print(json, json!({ "previous": rolled.previous }), &format!("{id} now expires at {until}"));
            ExitCode::SUCCESS
        }
        Command::Update { account, id, change } => {
            let id: KeyId = id.parse()?;
            let key = service.update_as_admin(&AccountId::new(account)?, &id, change.into_update()?).await?;
            print_list(&[key], json)?;
            ExitCode::SUCCESS
        }
        Command::Owner { account, owner, limits } => {
            let (account, owner) = (AccountId::new(account)?, OwnerId::new(owner)?);
            let limits = match limits.into_change()? {
                (None, None) => service.owner_limits(&account, &owner).await?,
                (credits, ratelimits) => {
                    let mut update = OwnerUpdate::default();
                    (update.credits, update.ratelimits) = (credits, ratelimits);
                    service.update_owner_as_admin(&account, &owner, update).await?
                }
            };
            print_owner(&owner, limits, json)?;
            ExitCode::SUCCESS
        }
        Command::List { account, owner } => {
            let account = AccountId::new(account)?;
            let keys = match owner.map(OwnerId::new).transpose()? {
                Some(owner) => service.list_owned_by(&account, &owner).await?,
                None => service.list(&account).await?,
            };
            print_list(&keys, json)?;
            ExitCode::SUCCESS
        }
        Command::Revoke { account, id, owner } => {
            let account = AccountId::new(account)?;
            match owner {
                Some(owner) => {
                    let revoked = service.revoke_owner_as_admin(&account, &OwnerId::new(owner)?).await?;
                    let lines: Vec<String> = revoked.iter().map(|id| format!("revoked {id}")).collect();
                    let text = if lines.is_empty() { "no key to revoke".to_owned() } else { lines.join("\n") };
                    print(json, json!({ "revoked": revoked }), &text);
                }
                None => {
                    // clap requires one of the two.
                    let id: KeyId = id.unwrap_or_default().parse()?;
                    service.revoke_as_admin(&account, &id).await?;
                    print(json, json!({ "revoked": id }), &format!("revoked {id}"));
                }
            }
            ExitCode::SUCCESS
        }
        Command::Audit { account, limit, cursor } => {
            let after = cursor.map(|cursor| cursor.parse()).transpose()?;
            print_audit(&service.audit_log(&AccountId::new(account)?, limit, after).await?, json)?;
            ExitCode::SUCCESS
        }
        Command::Webhooks { limit } => {
            print_webhooks(service.pending_webhooks().await?, &service.dead_webhooks(limit).await?, json)?;
            ExitCode::SUCCESS
        }
        Command::Verify { .. } => verify(&service, json).await?,
        Command::Scan { .. } => unreachable!("scanned above"),
    };
    service.flush().await?;
    Ok(code)
}

/// A new key's owner, meta, credits and rate limits.
#[derive(Args)]
struct UsageArgs {
    /// The external identity the key belongs to (1 to 128 printable ASCII characters).
    #[arg(long, value_name = "OWNER_ID")]
    owner: Option<String>,
    /// Host data to keep with the key: a JSON object of at most 4 KiB.
    #[arg(long, value_name = "JSON")]
    meta: Option<String>,
    /// Credits the key starts with; each use spends one [default: unlimited].
    #[arg(long, value_name = "N")]
    credits: Option<u64>,
    /// Set the credits back to N at each boundary of the interval (UTC): daily:N, monthly:N,
    /// or a duration such as 1h:N. Needs --credits.
    #[arg(long, value_name = "INTERVAL:N", requires = "credits", value_parser = parse_refill)]
    refill: Option<Refill>,
    /// A rate limit, NAME=LIMIT/WINDOW, e.g. requests=100/1s (a sliding window); repeat for
    /// more, up to 8.
    #[arg(long = "ratelimit", value_name = "NAME=LIMIT/WINDOW", value_parser = parse_rate_limit)]
    ratelimits: Vec<RateLimit>,
}

impl UsageArgs {
    fn into_new_key(self) -> Result<NewKey, Failure> {
        let mut new = NewKey::default();
        new.owner = self.owner.map(OwnerId::new).transpose()?;
        new.meta = self.meta.as_deref().map(Meta::new).transpose()?;
        new.credits = self.credits.map(Credits::new).transpose()?.map(|credits| match self.refill {
            Some(refill) => credits.refill(refill),
            None => credits,
        });
        if !self.ratelimits.is_empty() {
            new.ratelimits = Some(RateLimits::new(self.ratelimits)?);
        }
        Ok(new)
    }
}

/// What `update` changes.
#[derive(Args)]
struct ChangeArgs {
    /// A new label.
    #[arg(long, conflicts_with = "no_name")]
    name: Option<String>,
    /// Take the label away.
    #[arg(long)]
    no_name: bool,
    /// New host data: a JSON object of at most 4 KiB.
    #[arg(long, value_name = "JSON", conflicts_with = "no_meta")]
    meta: Option<String>,
    /// Take the host data away.
    #[arg(long)]
    no_meta: bool,
    #[command(flatten)]
    limits: LimitArgs,
}

/// What `update` and `owner` change of credits and rate limits.
#[derive(Args)]
struct LimitArgs {
    /// New credits; the balance starts again from them.
    #[arg(long, value_name = "N", conflicts_with = "unlimited")]
    credits: Option<u64>,
    /// How the new credits refill, as for create: daily:N, monthly:N, or 1h:N. Needs --credits.
    #[arg(long, value_name = "INTERVAL:N", requires = "credits", value_parser = parse_refill)]
    refill: Option<Refill>,
    /// Take the credits away: unlimited use.
    #[arg(long)]
    unlimited: bool,
    /// The new rate limits, NAME=LIMIT/WINDOW, replacing all of them; repeat for more.
    #[arg(long = "ratelimit", value_name = "NAME=LIMIT/WINDOW", value_parser = parse_rate_limit)]
    ratelimits: Vec<RateLimit>,
    /// Take every rate limit away.
    #[arg(long, conflicts_with = "ratelimits")]
    no_ratelimits: bool,
}

impl ChangeArgs {
    fn into_update(self) -> Result<KeyUpdate, Failure> {
        let mut update = KeyUpdate::default();
        if self.no_name || self.name.is_some() {
            update = update.name(self.name.map(KeyName::new).transpose()?);
        }
        if self.no_meta || self.meta.is_some() {
            update = update.meta(self.meta.as_deref().map(Meta::new).transpose()?);
        }
        (update.credits, update.ratelimits) = self.limits.into_change()?;
        Ok(update)
    }
}

impl LimitArgs {
    /// The credits and rate limits named, each `None` when left as they are.
    #[allow(clippy::type_complexity)]
    fn into_change(self) -> Result<(Option<Option<Credits>>, Option<RateLimits>), Failure> {
        let credits = (self.unlimited || self.credits.is_some())
            .then(|| {
                let credits = self.credits.map(Credits::new).transpose()?;
                Ok::<_, Failure>(credits.map(|credits| match self.refill {
                    Some(refill) => credits.refill(refill),
                    None => credits,
                }))
            })
            .transpose()?;
        let ratelimits = (self.no_ratelimits || !self.ratelimits.is_empty())
            .then(|| RateLimits::new(self.ratelimits))
            .transpose()?;
        Ok((credits, ratelimits))
    }
}

/// `daily:N`, `monthly:N` or `<duration>:N`, e.g. `1h:500`.
fn parse_refill(text: &str) -> Result<Refill, String> {
    let (interval, amount) = text.rsplit_once(':').ok_or("expected INTERVAL:N, e.g. daily:1000")?;
    let amount: u64 = amount.parse().map_err(|_| format!("{amount:?} is not a whole number"))?;
    let interval = match interval {
        "daily" => RefillInterval::Daily,
        "monthly" => RefillInterval::Monthly,
        duration => {
            let duration = humantime::parse_duration(duration).map_err(|error| format!("{duration:?}: {error}"))?;
            if duration.subsec_nanos() != 0 {
                return Err("a refill interval is whole seconds".into());
            }
            RefillInterval::seconds(duration.as_secs()).map_err(|error| error.to_string())?
        }
    };
    Refill::new(amount, interval).map_err(|error| error.to_string())
}

/// `NAME=LIMIT/WINDOW`, e.g. `requests=100/1s`.
fn parse_rate_limit(text: &str) -> Result<RateLimit, String> {
    let (name, rest) = text.split_once('=').ok_or("expected NAME=LIMIT/WINDOW, e.g. requests=100/1s")?;
    let (limit, window) = rest.split_once('/').ok_or("expected NAME=LIMIT/WINDOW, e.g. requests=100/1s")?;
    let limit: u32 = limit.parse().map_err(|_| format!("{limit:?} is not a whole number"))?;
    let window = humantime::parse_duration(window).map_err(|error| format!("{window:?}: {error}"))?;
    RateLimit::new(name, limit, window).map_err(|error| error.to_string())
}

/// Now plus `ttl`, or a clear error if that is past what a timestamp can hold.
fn expiry_after(ttl: Duration) -> Result<time::OffsetDateTime, Failure> {
    time::Duration::try_from(ttl)
        .ok()
        .and_then(|ttl| time::OffsetDateTime::now_utc().checked_add(ttl))
        .ok_or_else(|| Failure("--expires-in is too long: the expiry must be before the year 10000".into()))
}

/// What the tool needs of a store besides the key operations: upkeep, and the accounts the
/// dashboard lists.
trait ManagedStore: Maintenance + AccountListing {}

impl<S: Maintenance + AccountListing + ?Sized> ManagedStore for S {}

/// The service the tool runs: over whichever store was chosen, with its maintenance operations.
type Service = KeyService<Arc<dyn ManagedStore>>;

/// The service over the chosen store, and whether that store holds no key at all.
async fn open_service(args: &StoreArgs) -> Result<(Service, bool), Failure> {
    let store: Arc<dyn ManagedStore> = match args.backend {
        Backend::Sqlite => Arc::new(SqliteStore::open(args.file().unwrap_or_default())?),
        Backend::Redb => Arc::new(RedbStore::open(args.file().unwrap_or_default())?),
        Backend::Postgres => {
            let url = args
                .database_url
                .as_deref()
                .ok_or_else(|| Failure("--backend postgres needs --database-url (or APIKEYS_DATABASE_URL)".into()))?;
            let mut options = PostgresOptions::default();
            options.schema = args.schema.clone();
            options.ssl_mode = args.database_sslmode;
            options.ssl_root_cert = args.database_sslrootcert.clone();
            options.cache = args.cache_staleness.map(|staleness| {
                let mut cache = apikeys::CacheOptions::default();
                cache.max_staleness = staleness;
                cache
            });
            Arc::new(PostgresStore::connect_with(url, options).await?)
        }
        Backend::Memory => Arc::new(MemoryStore::new()),
    };
    let empty = store.is_empty().await?;
    let format = KeyFormat::new(&args.namespace, Environment::new(&args.environment)?)?;
    let mut builder = KeyService::builder(store, format);
    if let Some(pepper) = pepper_from_environment()? {
        builder = builder.pepper(pepper);
    }
    if args.accept_unpeppered_keys {
        builder = builder.accept_unpeppered_keys();
    }
    if args.rate_limits_fail_open {
        builder = builder.rate_limits_fail_open();
    }
    let mut builder = builder
        .store_deadline(args.store_deadline)
        .share_rate_limits(args.share_rate_limits)
        .audit_retention(args.audit_retention);
    for endpoint in webhook_endpoints(args.webhooks.as_deref())? {
        builder = builder.webhook(endpoint);
    }
    Ok((builder.build(), empty))
}

/// The webhook endpoints: `APIKEYS_WEBHOOK_URL` with `APIKEYS_WEBHOOK_SECRET` (named
/// "default"), and those of the file, if given.
fn webhook_endpoints(file: Option<&std::path::Path>) -> Result<Vec<Endpoint>, Failure> {
    let mut endpoints = Vec::new();
    if let Some(url) = std::env::var_os("APIKEYS_WEBHOOK_URL") {
        let url = url.into_string().map_err(|_| ValidationError::WebhookUrl)?;
        let secret = environment_secret("APIKEYS_WEBHOOK_SECRET")?;
        endpoints.push(Endpoint::new(EndpointName::new("default")?, &url, secret)?);
    }
    let Some(file) = file else { return Ok(endpoints) };
    let unreadable =
        |error: &dyn std::fmt::Display| Failure(format!("cannot read --webhooks {}: {error}", file.display()));
    let text = std::fs::read_to_string(file).map_err(|error| unreadable(&error))?;
    let config: WebhookConfig = serde_json::from_str(&text).map_err(|error| unreadable(&without_value(&error)))?;
    for endpoint in config.endpoints {
        let secret = match (endpoint.secret, endpoint.secret_env) {
            (Some(secret), None) => WebhookSecret::new(secret)?,
            (None, Some(variable)) => environment_secret(&variable)?,
            _ => return Err(unreadable(&format!("endpoint {:?} needs one of secret and secretEnv", endpoint.name))),
        };
        endpoints.push(Endpoint::new(EndpointName::new(&endpoint.name)?, &endpoint.url, secret)?);
    }
    Ok(endpoints)
}

/// What is wrong with a file of secrets, without the value it found: serde's "invalid type" and
/// "invalid value" name it (`invalid type: integer `…`, expected a string`), and it may be a
/// secret. What names only fields and places is kept whole.
fn without_value(error: &serde_json::Error) -> String {
    let message = error.to_string();
    match message.split_once(": ") {
        Some((kind, _)) if error.is_data() => format!("{kind} at line {} column {}", error.line(), error.column()),
        _ => message,
    }
}

/// A webhook secret from an environment variable, which must be set.
fn environment_secret(variable: &str) -> Result<WebhookSecret, Failure> {
    let secret = std::env::var_os(variable).ok_or_else(|| Failure(format!("{variable} is not set")))?;
    let secret = secret.into_string().map_err(|_| Failure(format!("{variable} is not valid UTF-8")))?;
    Ok(WebhookSecret::new(secret)?)
}

/// The file `--webhooks` names.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookConfig {
    endpoints: Vec<WebhookEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WebhookEntry {
    name: String,
    url: String,
    secret: Option<String>,
    secret_env: Option<String>,
}

/// `APIKEYS_PEPPER`, or the contents of the file named by `APIKEYS_PEPPER_FILE`, or none.
fn pepper_from_environment() -> Result<Option<Pepper>, Failure> {
    if std::env::var_os("APIKEYS_PEPPER").is_some() {
        return Ok(Some(Pepper::from_env("APIKEYS_PEPPER")?));
    }
    Ok(secret_file("APIKEYS_PEPPER_FILE")?.map(Pepper::new).transpose()?)
}

/// The credential in the environment variable `variable`, or in the file that `variable`_FILE
/// names, or none: `APIKEYS_SERVICE_TOKEN` for `POST /keys/verify`, `APIKEYS_ADMIN_TOKEN` for
/// the dashboard.
fn credential_from_environment(variable: &str) -> Result<Option<Credential>, Failure> {
    let secret = match std::env::var_os(variable) {
        Some(secret) => secret.into_string().map_err(|_| ValidationError::Credential)?.into_bytes(),
        None => match secret_file(&format!("{variable}_FILE"))? {
            Some(secret) => secret,
            None => return Ok(None),
        },
    };
    let secret = std::str::from_utf8(&secret).map_err(|_| ValidationError::Credential)?;
    let credential = Credential::new(secret).map_err(|error| Failure(format!("{variable}: {error}")))?;
    Ok(Some(credential))
}

/// The contents of the file named by the environment variable `variable`, without a trailing
/// newline, or none if it is not set.
fn secret_file(variable: &str) -> Result<Option<Vec<u8>>, Failure> {
    let Some(file) = std::env::var_os(variable) else { return Ok(None) };
    let mut secret = std::fs::read(&file)
        .map_err(|error| Failure(format!("cannot read {variable} {}: {error}", PathBuf::from(&file).display())))?;
    while secret.last().is_some_and(u8::is_ascii_whitespace) {
        secret.pop();
    }
    Ok(Some(secret))
}

/// What `serve` allows clients, with the defaults of [`ServeOptions`].
#[derive(Args)]
struct ServeLimits {
    /// How long a client may take to send a request's headers.
    #[arg(long, env = "APIKEYS_HEADER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    header_timeout: Duration,
    /// How long a client may pause while sending a body (then 408).
    #[arg(long, env = "APIKEYS_BODY_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    body_timeout: Duration,
    /// How many connections may be open at once.
    #[arg(long, env = "APIKEYS_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// How long requests in flight may take to finish after SIGTERM or SIGINT.
    #[arg(long, env = "APIKEYS_SHUTDOWN_DEADLINE", value_parser = humantime::parse_duration, default_value = "10s")]
    shutdown_deadline: Duration,
    /// How many leak reports of well-formed keys POST /leaks takes a minute, from everyone
    /// together (0: none).
    #[arg(long, env = "APIKEYS_LEAK_REPORTS_PER_MINUTE", default_value_t = 60)]
    leak_reports_per_minute: u32,
    /// How many wrong administrator's credentials serve takes a minute, at the dashboard's
    /// sign-in and on /admin together; once spent, no credential is compared until they refill.
    #[arg(long, env = "APIKEYS_ADMIN_GUESSES_PER_MINUTE", default_value_t = 10)]
    admin_guesses_per_minute: u32,
    /// Clients reach serve only over TLS (a proxy in front terminates it): the dashboard's
    /// session cookie is always the Secure `__Host-` one, and no other is counted.
    #[arg(long, env = "APIKEYS_BEHIND_TLS")]
    behind_tls: bool,
    /// GitHub's secret-scanning public keys, as api.github.com/meta/public_keys/secret_scanning
    /// answers: serve POST /leaks/github, GitHub's partner endpoint.
    #[arg(long, env = "APIKEYS_GITHUB_KEYS", value_name = "FILE")]
    github_keys: Option<PathBuf>,
}

impl ServeLimits {
    /// What the app serves besides the key routes: `POST /keys/verify` with `verification`, and
    /// the leak endpoints.
    fn app_options(
        &self,
        service: &Service,
        verification: Option<Credential>,
        admin: Option<Credential>,
    ) -> Result<AppOptions, Failure> {
        let mut leaks = LeakOptions::default();
        leaks.reports_per_minute = self.leak_reports_per_minute;
        if let Some(file) = &self.github_keys {
            let unreadable = |error: &dyn std::fmt::Display| {
                Failure(format!("cannot read --github-keys {}: {error}", file.display()))
            };
            let document = std::fs::read_to_string(file).map_err(|error| unreadable(&error))?;
            leaks.github = Some(GitHubKeys::from_json(&document).map_err(|error| unreadable(&error))?);
        }
        let mut options = AppOptions::default();
        options.verification = verification;
        options.leaks = Some(leaks);
        if let Some(admin) = admin {
            let mut dashboard = DashboardOptions::new(admin);
            dashboard.wrong_credentials_per_minute = self.admin_guesses_per_minute;
            dashboard.secure_cookie = self.behind_tls.then_some(true);
            options.routes = dashboard_router(service.clone(), dashboard);
        }
        Ok(options)
    }

    fn options(&self) -> ServeOptions {
        let mut options = ServeOptions::default();
        options.header_read_timeout = self.header_timeout;
        options.body_read_timeout = self.body_timeout;
        options.max_connections = self.max_connections;
        options.shutdown_deadline = self.shutdown_deadline;
        options
    }
}

/// Serves the HTTP API; first creates and prints a key for `first_key_for`, if given (an empty store).
async fn serve(
    service: Service,
    listen: SocketAddr,
    first_key_for: Option<AccountId>,
    options: ServeOptions,
    app: AppOptions,
    webhook_timing: (Duration, Duration, Duration),
    json: bool,
) -> Result<ExitCode, Failure> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("APIKEYS_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    if let Some(account) = &first_key_for {
        let first = NewKey::named("first key")?;
        let created = service.acting_as(Actor::system("serve")?).create(account, first).await?;
        if json {
            print_created(&created, true);
        } else {
            println!(
                "Created a first key for account {:?}. Store it securely; it will not be shown again:\n",
                account.as_str()
            );
            println!("    {}\n", created.key.expose_secret());
            println!("Try: curl http://{listen}/account/api-keys -H \"x-api-key: {}\"\n", created.key.expose_secret());
        }
    }
    service.spawn_flusher();
    service.spawn_rate_sharing();
    let (poll, timeout, lease) = webhook_timing;
    let delivery = WebhookOptions::default().poll(poll).timeout(timeout).lease(lease);
    service.spawn_webhooks_with(Arc::new(HttpTransport::default()), delivery);
    tokio::spawn(purge_audit_hourly(service.clone()));
    // The only routes serve adds to the app are the dashboard's.
    let dashboard = app.routes.has_routes();
    let app = apikeys::http::app(service.clone(), app);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|error| Failure(format!("cannot listen on {listen}: {error}")))?;
    let address = listener.local_addr()?;
    tracing::info!("listening on http://{address}");
    if dashboard {
        tracing::info!("the dashboard is at http://{address}/dashboard: sign in with APIKEYS_ADMIN_TOKEN");
    } else {
        tracing::info!(
            "the dashboard is off: set APIKEYS_ADMIN_TOKEN (or APIKEYS_ADMIN_TOKEN_FILE) to a secret of 32 characters \
             or more to serve it at /dashboard"
        );
    }
    apikeys::http::serve(listener, app, options, shutdown_requested()).await?;
    tracing::info!("shutting down: writing pending lastUsedAt");
    Ok(ExitCode::SUCCESS)
}

/// Deletes the audit events past their retention, now and every hour.
async fn purge_audit_hourly(service: Service) {
    let mut hours = tokio::time::interval(Duration::from_secs(60 * 60));
    loop {
        hours.tick().await;
        match service.purge_audit().await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "deleted audit events past their retention"),
            Err(error) => {
                tracing::warn!(error = &error as &dyn std::error::Error, "could not delete old audit events")
            }
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_requested() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async {
        match terminate.as_mut() {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = interrupt => {}
        () = terminated => {}
    }
}

async fn verify(service: &Service, json: bool) -> Result<ExitCode, Failure> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let token = line.trim();
    // An operator's check is no use of the key: it spends no credit and counts towards no limit.
    match service.verify_usage(token, &apikeys::Usage::check_only()).await {
        Ok(caller) => {
            let summary = format!("valid: key {} of account {:?}", caller.id, caller.account.as_str());
            print(
                json,
                json!({
                    "valid": true, "id": caller.id, "account": caller.account, "prefix": caller.prefix,
                    "scopes": caller.scopes,
                }),
                &summary,
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(apikeys::Rejection::Store(error)) => Err(error.into()),
        Err(rejection) => {
            let summary = format!("invalid: {rejection}");
            print(json, json!({ "valid": false, "reason": rejection.reason() }), &summary);
            Ok(ExitCode::from(1))
        }
    }
}

fn print(json: bool, value: serde_json::Value, text: &str) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

fn print_created(created: &CreatedKey, json: bool) {
    let body = json!({
        "id": created.id,
        "key": created.key.expose_secret(),
        "prefix": created.prefix,
        "name": created.name,
        "scopes": created.scopes,
        "expiresAt": created.expires_at.map(rfc3339),
        "message": CreatedKey::MESSAGE,
    });
    let mut body = body;
    let usage = [
        ("ownerId", created.owner.as_ref().map(|owner| json!(owner))),
        ("meta", created.meta.as_ref().map(|meta| json!(meta))),
        ("credits", created.credits.map(|credits| json!(credits))),
        ("ratelimits", (!created.ratelimits.is_empty()).then(|| json!(created.ratelimits))),
    ];
    for (field, value) in usage {
        if let Some(value) = value {
            body[field] = value;
        }
    }
    let text = format!("{}\n{}  {}", created.key.expose_secret(), created.id, CreatedKey::MESSAGE);
    print(json, body, &text);
}

fn print_list(keys: &[ApiKey], json: bool) -> Result<(), Failure> {
    if json {
        println!("{}", serde_json::to_string(&json!({ "data": keys }))?);
        return Ok(());
    }
    let time = |at: Option<time::OffsetDateTime>| at.map_or_else(|| "-".into(), rfc3339);
    let rows: Vec<[String; 10]> = keys
        .iter()
        .map(|key| {
            let name = key.name.as_ref().map_or_else(|| "-".into(), ToString::to_string);
            let created = time(Some(key.created_at));
            let replaced_by = key.replaced_by.map_or_else(|| "-".into(), |id| id.to_string());
            let (expires, last_used) = (time(key.expires_at), time(key.last_used_at));
            let owner = key.owner.as_ref().map_or_else(|| "-".into(), ToString::to_string);
            let credits = key.credits.map_or_else(|| "-".into(), |credits| credits.remaining.to_string());
            [
                key.id.to_string(),
                key.prefix.to_string(),
                name,
                key.scopes.to_string(),
                created,
                expires,
                last_used,
                replaced_by,
                owner,
                credits,
            ]
        })
        .collect();
    let header =
        ["ID", "PREFIX", "NAME", "SCOPES", "CREATED", "EXPIRES", "LAST USED", "ROLLED INTO", "OWNER", "CREDITS"];
    print_table(header, &rows);
    Ok(())
}

/// Rows under a header, each column as wide as its widest cell.
fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let header = header.map(String::from);
    let widths: Vec<usize> = (0..N)
        .map(|column| rows.iter().chain([&header]).map(|row| row[column].chars().count()).max().unwrap_or(0))
        .collect();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        println!("{}", cells.join("  ").trim_end());
    }
}

/// The outbox: how many deliveries wait, then a table of the dead ones; or the same as JSON.
fn print_webhooks(pending: u64, dead: &[DeadDelivery], json: bool) -> Result<(), Failure> {
    if json {
        let dead: Vec<serde_json::Value> = dead
            .iter()
            .map(|dead| {
                json!({
                    "endpoint": dead.endpoint.as_str(), "account": dead.account.as_str(),
                    "eventId": dead.event_id.to_string(), "at": rfc3339(dead.at), "attempts": dead.attempts,
                    "deadAt": rfc3339(dead.dead_at), "error": dead.error,
                })
            })
            .collect();
        println!("{}", serde_json::to_string(&json!({ "pending": pending, "dead": dead }))?);
        return Ok(());
    }
    println!("{pending} deliveries waiting; {} dead:", dead.len());
    let rows: Vec<[String; 6]> = dead
        .iter()
        .map(|dead| {
            [
                rfc3339(dead.dead_at),
                dead.endpoint.to_string(),
                dead.account.as_str().to_owned(),
                dead.event_id.to_string(),
                dead.attempts.to_string(),
                dead.error.clone(),
            ]
        })
        .collect();
    print_table(["DEAD AT", "ENDPOINT", "ACCOUNT", "EVENT", "ATTEMPTS", "LAST ERROR"], &rows);
    Ok(())
}

/// A page of the audit trail: a table, then where the next page starts; or the HTTP API's body.
fn print_audit(page: &AuditPage, json: bool) -> Result<(), Failure> {
    let next = page.next.map(|next| next.to_string());
    if json {
        let data: Vec<serde_json::Value> = page.events.iter().map(|event| event.to_json()).collect();
        println!("{}", serde_json::to_string(&json!({ "data": data, "nextCursor": next }))?);
        return Ok(());
    }
    let rows: Vec<[String; 6]> = page
        .events
        .iter()
        .map(|event| {
            let key = event.key_id.map_or_else(|| "-".into(), |id| id.to_string());
            let actor = format!("{}:{}", event.actor.kind().as_str(), event.actor.id());
            let request = event.request_id.as_ref().map_or_else(|| "-".into(), ToString::to_string);
            let detail = serde_json::Value::Object(event.detail.clone()).to_string();
            [rfc3339(event.at), event.action.as_str().into(), key, actor, request, detail]
        })
        .collect();
    print_table(["AT", "ACTION", "KEY", "ACTOR", "REQUEST", "DETAIL"], &rows);
    if let Some(next) = next {
        println!("\nolder events: --cursor {next}");
    }
    Ok(())
}

/// An owner's limits: a line of text, or the HTTP API's JSON body.
fn print_owner(owner: &OwnerId, limits: Option<OwnerLimits>, json: bool) -> Result<(), Failure> {
    let (credits, ratelimits) = OwnerLimits::parts_of(limits);
    let body = json!({ "ownerId": owner, "credits": credits, "ratelimits": ratelimits });
    let credits_text = credits.map_or_else(
        || "unlimited".to_owned(),
        |credits| match credits.refill {
            Some(refill) => format!("{} (refill {}:{})", credits.remaining, refill.interval.as_text(), refill.amount),
            None => credits.remaining.to_string(),
        },
    );
    // As --ratelimit takes them.
    let limits: Vec<String> = ratelimits
        .iter()
        .map(|limit| format!("{}={}/{}ms", limit.name(), limit.limit(), limit.window().as_millis()))
        .collect();
    let limits_text = if limits.is_empty() { "none".to_owned() } else { limits.join(" ") };
    print(json, body, &format!("owner {owner}: credits {credits_text}; rate limits {limits_text}"));
    Ok(())
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// `apikeys scan`: prints each key found as it is found, looked up in the store if there is one
/// (a store file that does not exist is not made: the keys are then shown without their ids).
async fn scan(args: &StoreArgs, paths: &[PathBuf], json: bool) -> Result<ExitCode, Failure> {
    let missing = args.file().filter(|file| !file.exists());
    let service = match &missing {
        Some(file) => {
            eprintln!("no store at {}: keys found are shown without their ids", file.display());
            None
        }
        None => Some(open_service(args).await?.0),
    };
    let scanner = Scanner::namespace(&args.namespace);
    // The scan reads files on a blocking thread and sends what it finds here, to be looked up.
    let (found, mut findings) = tokio::sync::mpsc::channel(64);
    let paths = paths.to_vec();
    let scanning = tokio::task::spawn_blocking(move || {
        scanner.scan_paths(&paths, |event| {
            let event = match event {
                ScanEvent::Found { path, finding } => Ok((path.to_path_buf(), finding)),
                ScanEvent::Binary { .. } => return,
                ScanEvent::Failed { path, error } => Err(format!("{}: {error}", path.display())),
            };
            let _ = found.blocking_send(event);
        });
    });
    let (mut keys, mut errors) = (0u64, 0u64);
    while let Some(event) = findings.recv().await {
        let (path, finding) = match event {
            Ok(found) => found,
            Err(message) => {
                errors += 1;
                eprintln!("{message}");
                continue;
            }
        };
        keys += 1;
        // A key the store cannot be asked about is still told, without its id.
        let state = match &service {
            Some(service) => match service.identify(finding.token.expose_secret()).await {
                Ok(state) => Some(state),
                Err(error) => {
                    errors += 1;
                    eprintln!("cannot look up the key at {}:{}: {error}", path.display(), finding.line);
                    None
                }
            },
            None => None,
        };
        let (state, key) = match &state {
            None => (None, None),
            Some(KeyState::Active(key)) => (Some("active"), Some(key)),
            Some(KeyState::Inactive(key)) => (Some("inactive"), Some(key)),
            Some(KeyState::Unknown) => (Some("unknown"), None),
        };
        let place = format!("{}:{}:{}", path.display(), finding.line, finding.column);
        if json {
            let line = json!({
                "path": path.display().to_string(),
                "line": finding.line,
                "column": finding.column,
                "prefix": finding.prefix.as_str(),
                "state": state,
                "keyId": key.map(|key| key.id.to_string()),
                "accountId": key.map(|key| key.account.as_str()),
            });
            println!("{line}");
        } else {
            let id = key.map_or_else(String::new, |key| format!(" {} of account {:?}", key.id, key.account.as_str()));
            let state = state.map_or_else(String::new, |state| format!(" ({state})"));
            println!("{place}: {}…{id}{state}", finding.prefix);
        }
    }
    scanning.await.map_err(|error| Failure(format!("the scan stopped: {error}")))?;
    // A key found is what a check in CI looks for (exit 1), whatever else could not be read.
    Ok(match (keys, errors) {
        (1.., _) => ExitCode::from(1),
        (0, 1..) => ExitCode::from(2),
        (0, 0) => ExitCode::SUCCESS,
    })
}

#[cfg(test)]
mod tests {
    use super::{has_password, redact_tokens};

    #[test]
    fn a_connection_string_with_a_password_is_told_apart() {
        for url in [
            "postgres://u:pw@db/keys",
            "postgresql://u:p%40w@db:5432/k?sslmode=require",
            "postgres://u@db/keys?sslmode=require&password=x",
            "host=db password=x",
        ] {
            assert!(has_password(url), "{url}");
        }
        for url in ["postgres://u@db/keys", "postgres://db/keys?user=a:b", "postgres://db/x@y", "host=db user=u"] {
            assert!(!has_password(url), "{url}");
        }
    }

    #[test]
    fn tokens_in_messages_keep_only_their_visible_prefix() {
        let token = "as_live_v1_u2vf7e3rrrk5pn34orvzj42xyfmgjrhmaag7x6a";
        assert_eq!(
            redact_tokens(&format!("error: unexpected argument '{token}' found")),
            "error: unexpected argument 'as_live_v1_u2vf[REDACTED]' found"
        );
        assert_eq!(redact_tokens("a_v1_ab and _v1_ and plain text"), "a_v1_ab and _v1_ and plain text");
        assert_eq!(redact_tokens(&format!("{token} {token}")).matches("[REDACTED]").count(), 2);
    }
}
