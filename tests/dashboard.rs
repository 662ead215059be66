//! The dashboard's handlers over a real socket, as a browser calls them: sign-in and sessions,
//! CSRF, every page and change, and bad input, which changes nothing. The browser itself is in
//! `browser.rs`.

mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use apikeys::http::{AppOptions, Credential, DashboardOptions, dashboard_router};
use apikeys::{AccountId, KeyService, MemoryStore, NewKey};
use regex::Regex;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use support::{Call, Instrumented, live};

const ADMIN_TOKEN: &str = "admin-credential-of-the-dashboard-tests-0123";

type Service = KeyService<Arc<Instrumented<MemoryStore>>>;

struct Dashboard {
    base: String,
    service: Service,
    store: Arc<Instrumented<MemoryStore>>,
    client: reqwest::Client,
}

/// A signed-in browser: its session cookie and the session's CSRF token.
struct Browser {
    cookie: String,
    csrf: String,
}

impl Dashboard {
    async fn start() -> Self {
        Self::start_with(|options| options).await
    }

    async fn start_with(configure: impl FnOnce(DashboardOptions) -> DashboardOptions) -> Self {
        let store = Arc::new(Instrumented::new(MemoryStore::new()));
        let service = KeyService::builder(store.clone(), live()).build();
        let dashboard = configure(DashboardOptions::new(Credential::new(ADMIN_TOKEN).unwrap()));
        let mut options = AppOptions::default();
        options.routes = dashboard_router(service.clone(), dashboard);
        let base = serve(apikeys::http::app(service.clone(), options)).await;
        let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Self { base, service, store, client }
    }

    async fn get(&self, path: &str, browser: Option<&Browser>) -> reqwest::Response {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(browser) = browser {
            request = request.header("cookie", &browser.cookie);
        }
        request.send().await.unwrap()
    }

    async fn post(&self, path: &str, browser: Option<&Browser>, form: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self.client.post(format!("{}{path}", self.base)).form(form);
        if let Some(browser) = browser {
            request = request.header("cookie", &browser.cookie);
        }
        request.send().await.unwrap()
    }

    /// A change, with the session's CSRF token.
    async fn change(&self, path: &str, browser: &Browser, form: &[(&str, &str)]) -> reqwest::Response {
        let mut form = form.to_vec();
        form.push(("csrf", &browser.csrf));
        self.post(path, Some(browser), &form).await
    }

    async fn sign_in(&self) -> Browser {
        let response = self.post("/dashboard/sign-in", None, &[("token", ADMIN_TOKEN)]).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        assert_eq!(response.headers()[LOCATION], "/dashboard/accounts");
        let cookie = response.headers()[SET_COOKIE].to_str().unwrap();
        let cookie = cookie.split(';').next().unwrap().to_owned();
        let page =
            self.get("/dashboard/accounts", Some(&Browser { cookie: cookie.clone(), csrf: String::new() })).await;
        let csrf = csrf_of(&page.text().await.unwrap());
        Browser { cookie, csrf }
    }

    /// A sign-in behind a TLS-terminating proxy that says so.
    async fn sign_in_over_tls(&self) -> reqwest::Response {
        let request = self.client.post(format!("{}/dashboard/sign-in", self.base)).form(&[("token", ADMIN_TOKEN)]);
        request.header("x-forwarded-proto", "https").send().await.unwrap()
    }

    /// The text of a page that must answer 200.
    async fn page(&self, path: &str, browser: &Browser) -> String {
        let response = self.get(path, Some(browser)).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response.text().await.unwrap()
    }
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

fn csrf_of(html: &str) -> String {
    static CSRF: OnceLock<Regex> = OnceLock::new();
    let csrf = CSRF.get_or_init(|| Regex::new(r#"name="csrf" value="([0-9a-f]{64})""#).unwrap());
    csrf.captures(html).expect("a form with the session's CSRF token")[1].to_owned()
}

/// The key a page shows once, if it shows one.
fn shown_key(html: &str) -> Option<String> {
    let key = Regex::new(r#"<code id="new-key"[^>]*>([^<]+)</code>"#).unwrap();
    key.captures(html).map(|captures| captures[1].to_owned())
}

fn account() -> AccountId {
    AccountId::new("acct dash/1").unwrap()
}

/// The account page's path: the id percent-encoded, as the pages link to it.
const ACCOUNT_PAGE: &str = "/dashboard/accounts/acct%20dash%2F1";

fn assert_protected(headers: &HeaderMap) {
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("default-src 'none'") && policy.contains("script-src 'self'"), "{policy}");
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["x-frame-options"], "DENY");
}

#[tokio::test]
async fn without_an_admin_credential_there_is_no_dashboard() {
    let service = KeyService::builder(MemoryStore::new(), live()).build();
    let base = serve(apikeys::http::app(service, AppOptions::default())).await;
    for path in ["/dashboard", "/dashboard/sign-in", "/dashboard/accounts", "/dashboard/assets/dashboard.js"] {
        let response = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(response.json::<serde_json::Value>().await.unwrap()["error"]["code"], "not_found");
    }
}

#[tokio::test]
async fn signing_in_takes_the_admin_token_and_sets_a_strict_expiring_cookie() {
    let dashboard = Dashboard::start().await;
    let home = dashboard.get("/dashboard", None).await;
    assert_eq!(home.status(), StatusCode::SEE_OTHER);
    assert_eq!(home.headers()[LOCATION], "/dashboard/sign-in");
    let form = dashboard.get("/dashboard/sign-in", None).await;
    assert_eq!(form.status(), StatusCode::OK);
    assert_protected(form.headers());
    let html = form.text().await.unwrap();
    assert!(html.contains(r#"<label for="token">Admin token</label>"#) && html.contains(">Sign in</button>"));

    for wrong in ["", "not-the-admin-token", &ADMIN_TOKEN[1..]] {
        let refused = dashboard.post("/dashboard/sign-in", None, &[("token", wrong)]).await;
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{wrong:?}");
        assert!(refused.headers().get(SET_COOKIE).is_none());
        assert!(refused.text().await.unwrap().contains("That is not the admin token."));
    }
    let signed = dashboard.post("/dashboard/sign-in", None, &[("token", ADMIN_TOKEN)]).await;
    assert_eq!(signed.status(), StatusCode::SEE_OTHER);
    let cookie = signed.headers()[SET_COOKIE].to_str().unwrap();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/dashboard", "Max-Age=28800"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http: {cookie}");
    assert!(!cookie.contains(ADMIN_TOKEN), "the cookie holds a session id, not the credential");

    // Behind a TLS-terminating proxy, the cookie is Secure.
    let behind_tls = dashboard.sign_in_over_tls().await;
    let secure = behind_tls.headers()[SET_COOKIE].to_str().unwrap();
    assert!(secure.starts_with("__Host-apikeys_dashboard="), "{secure}");
    for part in ["; Path=/;", "; Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(secure.contains(part), "{secure}");
    }

    // A cookie that is no session is sent to sign in.
    let forged = Browser { cookie: format!("apikeys_dashboard={}", "00".repeat(32)), csrf: String::new() };
    let response = dashboard.get("/dashboard/accounts", Some(&forged)).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/dashboard/sign-in");
}

#[tokio::test]
async fn repeated_sign_ins_are_slowed_down() {
    let dashboard = Dashboard::start_with(|mut options| {
        options.wrong_credentials_per_minute = 3;
        options
    })
    .await;
    for _ in 0..3 {
        let refused = dashboard.post("/dashboard/sign-in", None, &[("token", "guess-guess-guess")]).await;
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    }
    // Past the budget even the right token waits: guessing cannot go faster than the budget.
    let throttled = dashboard.post("/dashboard/sign-in", None, &[("token", ADMIN_TOKEN)]).await;
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = throttled.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(throttled.headers().get(SET_COOKIE).is_none());
    assert!(throttled.text().await.unwrap().contains("Too many sign-in attempts"));
}

#[tokio::test]
async fn a_created_key_is_shown_once_works_and_is_listed() {
    let dashboard = Dashboard::start().await;
    let browser = dashboard.sign_in().await;
    let empty = dashboard.page(ACCOUNT_PAGE, &browser).await;
    assert!(empty.contains("This account has no active key."));

    let created = dashboard
        .change(
            &format!("{ACCOUNT_PAGE}/keys"),
            &browser,
            &[
                ("name", "ci deploys"),
                ("expires", "30"),
                ("scopes", "orders:read keys:read"),
                ("owner", "team-7"),
                ("credits", "500"),
                ("refill", "daily"),
                ("per_minute", "120"),
            ],
        )
        .await;
    assert_eq!(created.status(), StatusCode::SEE_OTHER);
    assert_eq!(created.headers()[LOCATION], ACCOUNT_PAGE, "the key is never in a URL");
    let page = dashboard.page(ACCOUNT_PAGE, &browser).await;
    let token = shown_key(&page).expect("the new key, shown once");
    assert!(page.contains(r#"data-copy="new-key""#), "a copy button");

    let key = dashboard.service.verify(&token).await.expect("the shown key works");
    assert_eq!(key.account, account());
    assert_eq!(key.scopes.to_string(), "keys:read orders:read");
    assert_eq!(key.owner.unwrap().as_str(), "team-7");
    let listed = dashboard.service.list(&account()).await.unwrap();
    assert_eq!(listed.len(), 1);
    let listed = &listed[0];
    assert_eq!(listed.name.as_ref().unwrap().as_str(), "ci deploys");
    let expires = listed.expires_at.unwrap() - listed.created_at;
    assert!((expires - time::Duration::days(30)).abs() < time::Duration::seconds(5), "{expires}");
    assert_eq!(listed.credits.unwrap().remaining, 499, "500, less the verification's one");
    assert_eq!(listed.ratelimits.as_text(), "requests:120:60000");

    // A reload shows the key no more, but the table lists it, by prefix, never whole.
    let reloaded = dashboard.page(ACCOUNT_PAGE, &browser).await;
    assert_eq!(shown_key(&reloaded), None);
    assert!(!reloaded.contains(&token));
    assert!(
        reloaded.contains(listed.prefix.as_str()) && reloaded.contains("ci deploys") && reloaded.contains("team-7")
    );
    assert!(reloaded.contains("499 (refills daily)"));
    let events = dashboard.service.audit_log(&account(), 10, None).await.unwrap().events;
    assert_eq!((events[0].actor.kind().as_str(), events[0].actor.id()), ("admin", "dashboard"));
}

#[tokio::test]
async fn a_change_without_the_sessions_csrf_token_or_from_elsewhere_changes_nothing() {
    let dashboard = Dashboard::start().await;
    let browser = dashboard.sign_in().await;
    let create = format!("{ACCOUNT_PAGE}/keys");
    let no_token = dashboard.post(&create, Some(&browser), &[("name", "x")]).await;
    assert_eq!(no_token.status(), StatusCode::FORBIDDEN);
    let refusal = no_token.text().await.unwrap();
    assert!(refusal.contains("Nothing was changed"));
    assert!(refusal.contains(&format!("<a href=\"{ACCOUNT_PAGE}\">")), "links back to the account: {refusal}");
    let wrong = dashboard.post(&create, Some(&browser), &[("name", "x"), ("csrf", &"0".repeat(64))]).await;
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    for (header, value) in
        [("origin", "http://evil.example"), ("sec-fetch-site", "cross-site"), ("sec-fetch-site", "same-site")]
    {
        let response = dashboard
            .client
            .post(format!("{}{create}", dashboard.base))
            .header("cookie", &browser.cookie)
            .header(header, value)
            .form(&[("name", "x"), ("csrf", browser.csrf.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{header}: {value}");
    }
    // Without a session, a change goes to sign in.
    let signed_out = dashboard.post(&create, None, &[("name", "x"), ("csrf", &browser.csrf)]).await;
    assert_eq!(signed_out.status(), StatusCode::SEE_OTHER);
    assert!(dashboard.service.list(&account()).await.unwrap().is_empty());
    assert!(dashboard.service.audit_log(&account(), 10, None).await.unwrap().events.is_empty());
    // The same form from the dashboard's own origin is taken.
    let from_here = dashboard
        .client
        .post(format!("{}{create}", dashboard.base))
        .header("cookie", &browser.cookie)
        .header("origin", &dashboard.base)
        .header("sec-fetch-site", "same-origin")
        .form(&[("name", "x"), ("csrf", browser.csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(from_here.status(), StatusCode::SEE_OTHER);
    assert_eq!(dashboard.service.list(&account()).await.unwrap().len(), 1);
}

#[tokio::test]
async fn revoking_a_key_in_use_asks_first_then_refuses_it_at_once() {
    let dashboard = Dashboard::start().await;
    let browser = dashboard.sign_in().await;
    let created = dashboard.service.create(&account(), NewKey::named("in use").unwrap()).await.unwrap();
    let token = created.key.expose_secret().to_owned();
    dashboard.service.verify(&token).await.expect("in use");
    let revoke = format!("{ACCOUNT_PAGE}/keys/{}/revoke", created.id);

    let asked = dashboard.change(&revoke, &browser, &[("confirmed", "")]).await;
    assert_eq!(asked.status(), StatusCode::OK);
    let asked = asked.text().await.unwrap();
    assert!(
        asked.contains(&format!("Revoke {}…?", created.prefix)) && asked.contains(r#"name="confirmed" value="yes""#)
    );
    dashboard.service.verify(&token).await.expect("not revoked before the confirmation");

    let revoked = dashboard.change(&revoke, &browser, &[("confirmed", "yes")]).await;
    assert_eq!(revoked.status(), StatusCode::SEE_OTHER);
    assert!(dashboard.service.verify(&token).await.is_err(), "refused at once");
    let page = dashboard.page(ACCOUNT_PAGE, &browser).await;
    assert!(page.contains("was revoked"));
    assert!(page.contains("key.revoked") && page.contains("admin dashboard"), "the audit trail shows it");

    let again = dashboard.change(&revoke, &browser, &[("confirmed", "yes")]).await;
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn rolling_shows_the_new_key_once_and_keeps_the_old_one_for_its_grace() {
    let dashboard = Dashboard::start().await;
    let browser = dashboard.sign_in().await;
    let old = dashboard.service.create(&account(), NewKey::named("rolled").unwrap()).await.unwrap();
    let rolled =
        dashboard.change(&format!("{ACCOUNT_PAGE}/keys/{}/roll", old.id), &browser, &[("grace", "3600")]).await;
    assert_eq!(rolled.status(), StatusCode::SEE_OTHER);
    let page = dashboard.page(ACCOUNT_PAGE, &browser).await;
    let new = shown_key(&page).expect("the new key, shown once");
    assert!(page.contains("Key rolled"));
    let new = dashboard.service.verify(&new).await.unwrap();
    assert_eq!(new.name.unwrap().as_str(), "rolled");
    dashboard.service.verify(old.key.expose_secret()).await.expect("the old key works for its grace");
    let reloaded = dashboard.page(ACCOUNT_PAGE, &browser).await;
    assert_eq!(shown_key(&reloaded), None);
    assert!(reloaded.contains(&format!("into {}…", new.prefix)) && reloaded.contains(&format!("from {}…", old.prefix)));
}

#[tokio::test]
async fn bad_input_is_a_clear_error_and_changes_nothing() {
    let dashboard = Dashboard::start().await;
    let browser = dashboard.sign_in().await;
    let key = dashboard.service.create(&account(), NewKey::named("kept").unwrap()).await.unwrap();
    let create = format!("{ACCOUNT_PAGE}/keys");
    // A key of another service: an id this store does not hold.
    let elsewhere = KeyService::builder(MemoryStore::new(), live()).build();
    let elsewhere = elsewhere.create(&account(), NewKey::default()).await.unwrap();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("credits", "many")], "Credits must be a whole number"),
        (&[("credits", "-1")], "Credits must be a whole number"),
        (&[("refill", "daily")], "Credits refill only if the key has credits"),
        (&[("credits", "5"), ("refill", "hourly")], "Choose how credits refill."),
        (&[("expires", "tomorrow")], "Choose when the key expires."),
        (&[("scopes", "Orders:Read")], "invalid scope"),
        (&[("per_minute", "0")], "rate limit"),
        (&[("per_minute", "99999999999")], "Requests per minute is too large."),
        (&[("name", &"n".repeat(300))], "name"),
    ];
    for (form, says) in cases {
        let response = dashboard.change(&create, &browser, form).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{form:?}");
        let html = response.text().await.unwrap();
        assert!(html.to_lowercase().contains(&says.to_lowercase()), "{form:?} should say {says:?}");
        assert!(html.contains(r#"role="alert""#), "{form:?}");
        if let Some((_, value)) = form.iter().find(|(field, _)| *field == "credits") {
            assert!(html.contains(&format!(r#"name="credits" value="{value}""#)), "the form keeps what was sent");
        }
    }
    let path_cases = [
        ("/dashboard/accounts/caf%C3%A9/keys".to_owned(), StatusCode::BAD_REQUEST),
        (format!("{ACCOUNT_PAGE}/keys/not-an-id/revoke"), StatusCode::BAD_REQUEST),
        (format!("{ACCOUNT_PAGE}/keys/not-an-id/roll"), StatusCode::BAD_REQUEST),
        (format!("{ACCOUNT_PAGE}/keys/{}/revoke", elsewhere.id), StatusCode::NOT_FOUND),
        (format!("/dashboard/accounts/other/keys/{}/revoke", key.id), StatusCode::NOT_FOUND),
    ];
    for (path, status) in &path_cases {
        let response = dashboard.change(path, &browser, &[("confirmed", "yes"), ("grace", "0")]).await;
        assert_eq!(response.status(), *status, "{path}");
    }
    let roll = format!("{ACCOUNT_PAGE}/keys/{}/roll", key.id);
    for grace in ["soon", "-5", "99999999"] {
        let response = dashboard.change(&roll, &browser, &[("grace", grace)]).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{grace}");
        assert!(response.text().await.unwrap().contains("grace period"));
    }
    let not_a_form = dashboard
        .client
        .post(format!("{}{create}", dashboard.base))
        .header("cookie", &browser.cookie)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(not_a_form.status(), StatusCode::BAD_REQUEST);
    assert!(not_a_form.text().await.unwrap().contains(&format!("<a href=\"{ACCOUNT_PAGE}\">")));
    let bad_query = dashboard.get(&format!("/dashboard/accounts?after={}", "%C3%A9"), Some(&browser)).await;
    assert_eq!(bad_query.status(), StatusCode::BAD_REQUEST);
    let bad_cursor = dashboard.get(&format!("{ACCOUNT_PAGE}?events=nonsense"), Some(&browser)).await;
    assert_eq!(bad_cursor.status(), StatusCode::BAD_REQUEST);

    let keys = dashboard.service.list(&account()).await.unwrap();
    assert_eq!(keys.iter().map(|key| key.id).collect::<Vec<_>>(), [key.id], "nothing was created or changed");
    assert_eq!(keys[0].replaced_by, None);
    assert_eq!(dashboard.service.audit_log(&account(), 10, None).await.unwrap().events.len(), 1);
}

#[tokio::test]
async fn the_accounts_table_pages_and_searches() {
    let dashboard = Dashboard::start().await;
    let browser = dashboard.sign_in().await;
    for n in 0..120 {
        let account = AccountId::new(format!("acct-{n:03}")).unwrap();
        dashboard.service.create(&account, NewKey::default()).await.unwrap();
    }
    let revoked = AccountId::new("acct-gone").unwrap();
    let gone = dashboard.service.create(&revoked, NewKey::default()).await.unwrap();
    dashboard.service.revoke_as_admin(&revoked, &gone.id).await.unwrap();

    let link = Regex::new(r#"<a href="/dashboard/accounts/(acct-[0-9]{3})">"#).unwrap();
    let next = Regex::new(r#"<a href="([^"]+)" rel="next">Next page</a>"#).unwrap();
    let (mut seen, mut path) = (Vec::new(), "/dashboard/accounts".to_owned());
    for _ in 0..10 {
        let html = dashboard.page(&path, &browser).await;
        let page: Vec<String> = link.captures_iter(&html).map(|captures| captures[1].to_owned()).collect();
        assert!(page.len() <= 50);
        seen.extend(page);
        match next.captures(&html) {
            Some(captures) => path = captures[1].replace("&#38;", "&").replace("&amp;", "&"),
            None => break,
        }
    }
    let every: Vec<String> = (0..120).map(|n| format!("acct-{n:03}")).collect();
    assert_eq!(seen, every, "three pages, in order, no account twice, the revoked one left out");

    let found = dashboard.page("/dashboard/accounts?q=-11", &browser).await;
    let found: Vec<String> = link.captures_iter(&found).map(|captures| captures[1].to_owned()).collect();
    assert_eq!(found, (110..120).map(|n| format!("acct-{n}")).collect::<Vec<_>>());
    let none = dashboard.page("/dashboard/accounts?q=acct-gone", &browser).await;
    assert!(none.contains("No account with active keys"));
    assert!(none.contains(r#"<a href="/dashboard/accounts/acct-gone">acct-gone</a>"#), "opened by its id");
}

#[tokio::test]
async fn signing_out_ends_the_session_for_good() {
    let dashboard = Dashboard::start().await;
    let browser = dashboard.sign_in().await;
    let out = dashboard.post("/dashboard/sign-out", Some(&browser), &[]).await;
    assert_eq!(out.status(), StatusCode::FORBIDDEN, "sign-out needs the CSRF token too");
    let out = dashboard.change("/dashboard/sign-out", &browser, &[]).await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_eq!(out.headers()[LOCATION], "/dashboard/sign-in");
    assert!(out.headers()[SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
    // The old cookie, replayed, is no session any more.
    let replayed = dashboard.get("/dashboard/accounts", Some(&browser)).await;
    assert_eq!(replayed.status(), StatusCode::SEE_OTHER);
    let created = dashboard.change(&format!("{ACCOUNT_PAGE}/keys"), &browser, &[("name", "x")]).await;
    assert_eq!(created.status(), StatusCode::SEE_OTHER);
    assert_eq!(created.headers()[LOCATION], "/dashboard/sign-in");
    assert!(dashboard.service.list(&account()).await.unwrap().is_empty());
}

#[tokio::test]
async fn sessions_expire() {
    let dashboard = Dashboard::start_with(|mut options| {
        options.session_lifetime = Duration::from_millis(300);
        options
    })
    .await;
    let browser = dashboard.sign_in().await;
    dashboard.page("/dashboard/accounts", &browser).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let expired = dashboard.get("/dashboard/accounts", Some(&browser)).await;
    assert_eq!(expired.status(), StatusCode::SEE_OTHER);
    assert_eq!(expired.headers()[LOCATION], "/dashboard/sign-in");
}

#[tokio::test]
async fn the_key_table_sorts_and_filters_on_the_server() {
    let dashboard = Dashboard::start().await;
    let browser = dashboard.sign_in().await;
    for name in ["bravo", "alpha", "charlie"] {
        dashboard.service.create(&account(), NewKey::named(name).unwrap()).await.unwrap();
    }
    let order = |html: &str| {
        let names = Regex::new(r#"<td data-label="Name">(alpha|bravo|charlie)</td>"#).unwrap();
        names.captures_iter(html).map(|captures| captures[1].to_owned()).collect::<Vec<_>>()
    };
    let created = dashboard.page(ACCOUNT_PAGE, &browser).await;
    assert_eq!(order(&created), ["bravo", "alpha", "charlie"], "oldest first by default");
    let by_name = dashboard.page(&format!("{ACCOUNT_PAGE}?sort=name&dir=asc"), &browser).await;
    assert_eq!(order(&by_name), ["alpha", "bravo", "charlie"]);
    assert!(by_name.contains(r#"aria-sort="ascending""#));
    let reversed = dashboard.page(&format!("{ACCOUNT_PAGE}?sort=name&dir=desc"), &browser).await;
    assert_eq!(order(&reversed), ["charlie", "bravo", "alpha"]);
    let filtered = dashboard.page(&format!("{ACCOUNT_PAGE}?filter=ARL"), &browser).await;
    assert_eq!(order(&filtered), ["charlie"]);
    assert!(filtered.contains("1 of 3"));
    // A key pasted into the filter: the page it asks for is the one of its prefix.
    let created = dashboard.service.create(&account(), NewKey::named("delta").unwrap()).await.unwrap();
    let token = created.key.expose_secret();
    let pasted = dashboard.get(&format!("{ACCOUNT_PAGE}?sort=name&filter=+{token}+"), Some(&browser)).await;
    assert_eq!(pasted.status(), StatusCode::SEE_OTHER);
    let to = pasted.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(to, format!("{ACCOUNT_PAGE}?sort=name&dir=asc&filter={}", created.prefix));
    assert!(!pasted.text().await.unwrap().contains(&token[15..]));
    assert!(order(&dashboard.page(&to, &browser).await).is_empty(), "delta only");
    assert!(dashboard.page(&to, &browser).await.contains(r#"<td data-label="Name">delta</td>"#));
}

#[tokio::test]
async fn the_assets_are_compiled_in_and_the_pages_load_nothing_else() {
    let dashboard = Dashboard::start().await;
    let browser = dashboard.sign_in().await;
    for (asset, kind) in [("dashboard.css", "text/css"), ("dashboard.js", "text/javascript")] {
        let response = dashboard.get(&format!("/dashboard/assets/{asset}"), None).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with(kind));
    }
    assert_eq!(dashboard.get("/dashboard/assets/other.js", None).await.status(), StatusCode::NOT_FOUND);
    let html = dashboard.page(ACCOUNT_PAGE, &browser).await;
    let sources = Regex::new(r#"(?:src|href)="([^"]+)""#).unwrap();
    for source in sources.captures_iter(&html) {
        assert!(source[1].starts_with('/') || source[1].starts_with('#'), "{}", &source[1]);
    }
    assert!(!html.contains("<script>") && !html.contains(" style=") && !html.contains(" onclick="));
}

/// `/admin`, the same operations for scripts, with the admin token as a bearer credential.
#[tokio::test]
async fn the_admin_routes_take_the_admin_token_and_do_what_the_dashboard_does() {
    let dashboard = Dashboard::start().await;
    let admin = |method: reqwest::Method, path: &str| {
        dashboard.client.request(method, format!("{}{path}", dashboard.base)).bearer_auth(ADMIN_TOKEN)
    };
    for (method, path) in
        [(reqwest::Method::GET, "/admin/accounts"), (reqwest::Method::POST, "/admin/accounts/a/api-keys")]
    {
        let anonymous =
            dashboard.client.request(method.clone(), format!("{}{path}", dashboard.base)).send().await.unwrap();
        assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
        let wrong = dashboard.client.request(method, format!("{}{path}", dashboard.base)).bearer_auth("x".repeat(40));
        assert_eq!(wrong.send().await.unwrap().status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    assert!(dashboard.service.list(&account()).await.unwrap().is_empty(), "a refused create creates nothing");

    let path = "/admin/accounts/acct%20dash%2F1/api-keys";
    let created =
        admin(reqwest::Method::POST, path).json(&serde_json::json!({"name": "scripted"})).send().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: serde_json::Value = created.json().await.unwrap();
    assert_eq!(created["scopes"], serde_json::json!(["*"]));
    let token = created["key"].as_str().unwrap();
    dashboard.service.verify(token).await.expect("the created key works");
    let id = created["id"].as_str().unwrap();

    let listed: serde_json::Value = admin(reqwest::Method::GET, path).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["data"][0]["id"], id);
    assert!(listed["data"][0].get("key").is_none(), "a listing holds no token");
    let accounts: serde_json::Value =
        admin(reqwest::Method::GET, "/admin/accounts?limit=1").send().await.unwrap().json().await.unwrap();
    assert_eq!(
        accounts,
        serde_json::json!({"data": [{"accountId": "acct dash/1", "activeKeys": 1}], "nextCursor": null})
    );

    let rolled = admin(reqwest::Method::POST, &format!("{path}/{id}/roll"))
        .json(&serde_json::json!({"graceSeconds": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(rolled.status(), StatusCode::CREATED);
    let rolled: serde_json::Value = rolled.json().await.unwrap();
    assert_eq!(rolled["previous"]["id"], id);
    let new_id = rolled["id"].as_str().unwrap();
    let revoked = admin(reqwest::Method::DELETE, &format!("{path}/{new_id}")).send().await.unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    assert!(dashboard.service.verify(rolled["key"].as_str().unwrap()).await.is_err());
    let again = admin(reqwest::Method::DELETE, &format!("{path}/{new_id}")).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);

    let trail: serde_json::Value = admin(reqwest::Method::GET, "/admin/accounts/acct%20dash%2F1/audit-log?limit=2")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let actions: Vec<&str> =
        trail["data"].as_array().unwrap().iter().map(|event| event["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["key.revoked", "key.rolled"]);
    assert_eq!(trail["data"][0]["actor"], serde_json::json!({"type": "admin", "id": "api"}));
    assert!(trail["nextCursor"].is_string());

    for (method, path, code) in [
        (reqwest::Method::GET, "/admin/accounts?limit=0", "invalid_query"),
        (reqwest::Method::GET, "/admin/accounts?after=caf%C3%A9", "invalid_query"),
        (reqwest::Method::GET, "/admin/accounts?color=red", "invalid_query"),
        (reqwest::Method::GET, "/admin/accounts/caf%C3%A9/api-keys", "invalid_account_id"),
        (reqwest::Method::DELETE, "/admin/accounts/a/api-keys/nope", "invalid_key_id"),
        (reqwest::Method::DELETE, "/admin/accounts/%FF/api-keys/nope", "invalid_account_id"),
        (reqwest::Method::DELETE, "/admin/accounts/a/api-keys/%FF", "invalid_key_id"),
        (reqwest::Method::GET, "/admin/accounts/a/audit-log?cursor=nope", "invalid_cursor"),
    ] {
        let response = admin(method, path).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(response.json::<serde_json::Value>().await.unwrap()["error"]["code"], code, "{path}");
    }
    let bad_body =
        admin(reqwest::Method::POST, path).json(&serde_json::json!({"expires_at": "soon"})).send().await.unwrap();
    assert_eq!(bad_body.status(), StatusCode::BAD_REQUEST);
    assert_eq!(dashboard.service.list(&account()).await.unwrap().len(), 1, "the old key, in its grace period");
}

/// Ids a browser would resolve away as a path (`.`, `..`) or that look like the escape of one
/// get pages of their own, and the changes made on them land on them.
#[tokio::test]
async fn accounts_with_ids_of_dots_tildes_and_url_characters_have_pages_of_their_own() {
    let dashboard = Dashboard::start().await;
    let browser = dashboard.sign_in().await;
    let link = Regex::new(r#"<a href="(/dashboard/accounts/[^"]+)">"#).unwrap();
    for id in [".", "..", "~.", "~x", "a b/c?d#e%f&g", " padded "] {
        let account = AccountId::new(id).unwrap();
        dashboard.service.create(&account, NewKey::named("first").unwrap()).await.unwrap();
        let search =
            format!("/dashboard/accounts?q={}", id.bytes().map(|byte| format!("%{byte:02X}")).collect::<String>());
        let found = dashboard.page(&search, &browser).await;
        let href = link.captures(&found).unwrap_or_else(|| panic!("{id:?} is found: {found}"))[1].replace("&#38;", "&");
        let page = dashboard.page(&href, &browser).await;
        assert!(page.contains("first"), "{id:?} at {href}");
        let created = dashboard.change(&format!("{href}/keys"), &browser, &[("name", "second")]).await;
        assert_eq!(created.status(), StatusCode::SEE_OTHER, "{id:?}");
        assert_eq!(created.headers()[LOCATION], href.as_str(), "{id:?}");
        let keys = dashboard.service.list(&account).await.unwrap();
        assert_eq!(keys.len(), 2, "{id:?}: the change landed on its account");
    }
}

/// A key created in one tab is still shown once there after another tab's change, and a page
/// that could not be shown keeps it for the next.
#[tokio::test]
async fn a_created_key_waits_through_other_changes_and_failed_pages_until_it_is_shown() {
    let dashboard = Dashboard::start().await;
    let browser = dashboard.sign_in().await;
    let other = dashboard.service.create(&AccountId::new("other").unwrap(), NewKey::default()).await.unwrap();
    let created = dashboard.change(&format!("{ACCOUNT_PAGE}/keys"), &browser, &[("name", "tab one")]).await;
    assert_eq!(created.status(), StatusCode::SEE_OTHER);
    let revoke = format!("/dashboard/accounts/other/keys/{}/revoke", other.id);
    assert_eq!(dashboard.change(&revoke, &browser, &[("confirmed", "yes")]).await.status(), StatusCode::SEE_OTHER);
    assert!(dashboard.page("/dashboard/accounts/other", &browser).await.contains("was revoked"));

    dashboard.store.fail(Call::ListActive, true);
    let failed = dashboard.get(ACCOUNT_PAGE, Some(&browser)).await;
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shown_key(&failed.text().await.unwrap()), None);
    dashboard.store.fail(Call::ListActive, false);
    let token = shown_key(&dashboard.page(ACCOUNT_PAGE, &browser).await).expect("the key, shown once at last");
    assert_eq!(dashboard.service.verify(&token).await.unwrap().name.unwrap().as_str(), "tab one");
    assert_eq!(shown_key(&dashboard.page(ACCOUNT_PAGE, &browser).await), None);
}

/// Wrong credentials at sign-in and on `/admin` share one budget; once it is spent, the right
/// one waits too, wherever it is presented.
#[tokio::test]
async fn wrong_credentials_on_admin_and_at_sign_in_share_one_throttle() {
    let dashboard = Dashboard::start_with(|mut options| {
        options.wrong_credentials_per_minute = 2;
        options
    })
    .await;
    let admin =
        |token: &str| dashboard.client.get(format!("{}/admin/accounts", dashboard.base)).bearer_auth(token).send();
    assert_eq!(admin(ADMIN_TOKEN).await.unwrap().status(), StatusCode::OK, "the right one takes nothing");
    assert_eq!(admin("wrong-wrong-wrong").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let wrong_sign_in = dashboard.post("/dashboard/sign-in", None, &[("token", "wrong")]).await;
    assert_eq!(wrong_sign_in.status(), StatusCode::UNAUTHORIZED);
    let throttled = admin(ADMIN_TOKEN).await.unwrap();
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(throttled.headers().contains_key("retry-after"));
    let sign_in = dashboard.post("/dashboard/sign-in", None, &[("token", ADMIN_TOKEN)]).await;
    assert_eq!(sign_in.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn signing_in_again_ends_the_browsers_old_session_and_tls_makes_the_cookie_secure() {
    let dashboard = Dashboard::start().await;
    let old = dashboard.sign_in().await;
    // A plain cookie may count on a page load that says nothing of TLS, and not on the change
    // after it, which says it came over https: so the sign-in page shows its form, or the
    // browser would go back and forth between it and the page it came from.
    let form = dashboard.get("/dashboard/sign-in", Some(&old)).await;
    assert_eq!(form.status(), StatusCode::OK, "the sign-in form, not a redirect");
    let again = dashboard
        .client
        .post(format!("{}/dashboard/sign-in", dashboard.base))
        .header("cookie", &old.cookie)
        .header("origin", "https://keys.example.com")
        .header("sec-fetch-site", "same-origin")
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::SEE_OTHER);
    let cookie = again.headers()[SET_COOKIE].to_str().unwrap();
    assert!(cookie.contains("; Secure"), "signed in over https, as the browser says: {cookie}");
    let cookies: Vec<&str> = again.headers().get_all(SET_COOKIE).iter().map(|value| value.to_str().unwrap()).collect();
    assert!(cookies[0].starts_with("__Host-apikeys_dashboard="), "{cookies:?}");
    let deleted = cookies.get(1).expect("the plain cookie deleted too");
    assert!(deleted.starts_with("apikeys_dashboard=;") && deleted.contains("Path=/dashboard"), "{deleted}");
    assert!(deleted.contains("Max-Age=0"), "{deleted}");
    let replayed = dashboard.get("/dashboard/accounts", Some(&old)).await;
    assert_eq!(replayed.status(), StatusCode::SEE_OTHER, "the old session is over");
}

/// A page load over TLS (behind a proxy that says so) with `cookie`.
async fn over_tls(dashboard: &Dashboard, path: &str, cookie: &str) -> reqwest::Response {
    let request = dashboard.client.get(format!("{}{path}", dashboard.base)).header("cookie", cookie);
    request.header("x-forwarded-proto", "https").send().await.unwrap()
}

#[tokio::test]
async fn over_tls_only_the_host_cookie_counts_so_no_other_site_can_plant_a_session() {
    let dashboard = Dashboard::start().await;
    let signed = dashboard.sign_in_over_tls().await;
    let cookie = signed.headers()[SET_COOKIE].to_str().unwrap().split(';').next().unwrap().to_owned();
    let id = cookie.strip_prefix("__Host-apikeys_dashboard=").expect("a __Host- cookie over TLS");
    assert_eq!(over_tls(&dashboard, "/dashboard/accounts", &cookie).await.status(), StatusCode::OK);

    // The same session under the plain name, as a sibling subdomain or a page over plain HTTP
    // could set it: a request over TLS does not count it.
    let planted = format!("apikeys_dashboard={id}");
    let refused = over_tls(&dashboard, "/dashboard/accounts", &planted).await;
    assert_eq!(refused.status(), StatusCode::SEE_OTHER, "a planted cookie is no session over TLS");
    assert_eq!(refused.headers()[LOCATION], "/dashboard/sign-in");
    // Beside the real one, the real one counts.
    let both = format!("apikeys_dashboard={}; {cookie}", "00".repeat(32));
    assert_eq!(over_tls(&dashboard, "/dashboard/accounts", &both).await.status(), StatusCode::OK);

    // Told the dashboard is behind TLS, it counts only the __Host- cookie on every request, even
    // one that says nothing of TLS.
    let strict = Dashboard::start_with(|mut options| {
        options.secure_cookie = Some(true);
        options
    })
    .await;
    let browser = strict.sign_in().await;
    let id = browser.cookie.strip_prefix("__Host-apikeys_dashboard=").expect("a __Host- cookie");
    assert_eq!(strict.get("/dashboard/accounts", Some(&browser)).await.status(), StatusCode::OK);
    let planted = Browser { cookie: format!("apikeys_dashboard={id}"), csrf: String::new() };
    assert_eq!(strict.get("/dashboard/accounts", Some(&planted)).await.status(), StatusCode::SEE_OTHER);

    // Signing out over TLS deletes the __Host- cookie.
    let out = strict.change("/dashboard/sign-out", &browser, &[]).await;
    let deleted = out.headers()[SET_COOKIE].to_str().unwrap();
    assert!(deleted.starts_with("__Host-apikeys_dashboard=;") && deleted.contains("Max-Age=0"), "{deleted}");
    assert!(deleted.contains("; Path=/;") && deleted.contains("; Secure"), "{deleted}");
}
