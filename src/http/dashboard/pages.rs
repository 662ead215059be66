//! The dashboard's pages: askama templates (checked when the crate compiles) and what they show,
//! worked out here so that the templates only lay it out.

use std::collections::HashMap;

use askama::Template;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

use crate::audit::{Action, AuditEvent};
use crate::id::{AccountId, KeyId};
use crate::key::ApiKey;
use crate::store::AccountSummary;

/// What a path segment or a query value may hold unescaped.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// `text` percent-encoded for a path segment or a query value.
pub(super) fn encode(text: &str) -> String {
    utf8_percent_encode(text, UNRESERVED).to_string()
}

/// The path of an account's page.
pub(super) fn account_href(account: &AccountId) -> String {
    format!("/dashboard/accounts/{}", segment(account))
}

/// An account id as one path segment. A browser resolves a segment of only dots (`.`, `..`)
/// away, escaped or not, so such an id, and any that starts with `~`, gets a `~` in front,
/// which [`account_in`] takes off again.
fn segment(account: &AccountId) -> String {
    let id = account.as_str();
    let escape = id.starts_with('~') || id.bytes().all(|byte| byte == b'.');
    format!("{}{}", if escape { "~" } else { "" }, encode(id))
}

/// The account id of a path segment [`segment`] made (as the router has decoded it).
pub(super) fn account_in(segment: &str) -> &str {
    segment.strip_prefix('~').unwrap_or(segment)
}

/// An account page sorted and filtered as given, at the audit trail's page after `events`.
pub(super) fn account_view_href(
    account_href: &str,
    sort: &str,
    dir: &str,
    filter: &str,
    events: Option<&str>,
) -> String {
    let mut href = format!("{account_href}?sort={sort}&dir={dir}&filter={}", encode(filter));
    if let Some(events) = events {
        href.push_str("&events=");
        href.push_str(&encode(events));
    }
    href
}

/// An instant, as a `<time>` shows it.
pub(super) struct When {
    iso: String,
    text: String,
}

impl When {
    fn of(at: OffsetDateTime) -> Option<Self> {
        Some(Self { iso: at.format(&Rfc3339).ok()?, text: Self::text_of(at) })
    }

    /// The instant as the pages write it, to the minute (in UTC, as the page says).
    pub(super) fn text_of(at: OffsetDateTime) -> String {
        let text = at.format(format_description!("[year]-[month]-[day] [hour]:[minute]"));
        // Formatting fails only for a year past 9999, which no stored time has.
        text.unwrap_or_default()
    }
}

#[derive(Template)]
#[template(path = "sign_in.html")]
pub(super) struct SignInPage {
    /// Empty: not signed in, so no navigation.
    pub(super) csrf: String,
    pub(super) error: Option<String>,
}

/// A page that says one thing: an error, or why nothing was done.
#[derive(Template)]
#[template(path = "message.html")]
pub(super) struct MessagePage {
    pub(super) csrf: String,
    pub(super) title: &'static str,
    pub(super) message: String,
    pub(super) back: String,
    pub(super) back_label: &'static str,
}

#[derive(Template)]
#[template(path = "accounts.html")]
pub(super) struct AccountsPage {
    pub(super) csrf: String,
    pub(super) search: String,
    pub(super) accounts: Vec<AccountRow>,
    /// A link to the account whose id is the search, active keys or not.
    pub(super) open: Option<AccountRow>,
    pub(super) first: Option<String>,
    pub(super) next: Option<String>,
}

pub(super) struct AccountRow {
    pub(super) account: String,
    pub(super) href: String,
    pub(super) active_keys: u64,
}

impl AccountRow {
    pub(super) fn of(summary: &AccountSummary) -> Self {
        Self {
            account: summary.account.as_str().to_owned(),
            href: account_href(&summary.account),
            active_keys: summary.active_keys,
        }
    }
}

/// The page of `search`'s accounts after `after`.
pub(super) fn accounts_href(search: &str, after: Option<&AccountId>) -> String {
    let mut href = format!("/dashboard/accounts?q={}", encode(search));
    if let Some(after) = after {
        href.push_str("&after=");
        href.push_str(&encode(after.as_str()));
    }
    href
}

#[derive(Template)]
#[template(path = "account.html")]
pub(super) struct AccountPage<'a> {
    pub(super) csrf: String,
    pub(super) account: &'a str,
    pub(super) href: String,
    pub(super) created: Option<CreatedView<'a>>,
    pub(super) notice: Option<String>,
    pub(super) error: Option<String>,
    pub(super) keys: Vec<KeyRow>,
    pub(super) total: usize,
    pub(super) shown: usize,
    pub(super) columns: Vec<Column>,
    pub(super) sort: &'static str,
    pub(super) dir: &'static str,
    pub(super) filter: String,
    pub(super) form: CreateForm,
    pub(super) expiries: &'static [(&'static str, &'static str)],
    pub(super) refills: &'static [(&'static str, &'static str)],
    pub(super) events: Vec<EventRow>,
    pub(super) newest: Option<String>,
    pub(super) older: Option<String>,
}

/// A key just created or rolled, shown this once.
pub(super) struct CreatedView<'a> {
    pub(super) title: String,
    pub(super) key: &'a str,
    pub(super) previous: Option<String>,
}

/// What the create form was sent with, to show again beside its error.
#[derive(Default, serde::Deserialize)]
#[serde(default)]
pub(super) struct CreateForm {
    pub(super) name: String,
    pub(super) expires: String,
    pub(super) scopes: String,
    pub(super) owner: String,
    pub(super) credits: String,
    pub(super) refill: String,
    pub(super) per_minute: String,
}

/// The expiry choices: days from now, and their labels.
pub(super) const EXPIRIES: &[(&str, &str)] = &[
    ("", "Never"),
    ("1", "In 1 day"),
    ("7", "In 7 days"),
    ("30", "In 30 days"),
    ("90", "In 90 days"),
    ("365", "In 1 year"),
];

/// The refill choices of credits.
pub(super) const REFILLS: &[(&str, &str)] =
    &[("", "Never"), ("daily", "Daily, at midnight UTC"), ("monthly", "Monthly, on the 1st")];

pub(super) struct KeyRow {
    pub(super) id: String,
    pub(super) prefix: String,
    pub(super) name: String,
    pub(super) scopes: Vec<String>,
    pub(super) owner: String,
    pub(super) created: Option<When>,
    pub(super) last_used: Option<When>,
    pub(super) expires: Option<When>,
    pub(super) credits: String,
    pub(super) rolled: String,
    /// The path the key's forms post under.
    pub(super) action_href: String,
    /// What the filter looks in, lowercased.
    pub(super) search: String,
}

impl KeyRow {
    pub(super) fn of(key: &ApiKey, account_href: &str, prefixes: &HashMap<KeyId, &str>) -> Self {
        let name = key.name.as_ref().map(|name| name.as_str().to_owned()).unwrap_or_default();
        let owner = key.owner.as_ref().map(|owner| owner.as_str().to_owned()).unwrap_or_default();
        let scopes: Vec<String> = key.scopes.iter().map(str::to_owned).collect();
        let credits = match key.credits {
            None => "Unlimited".to_owned(),
            Some(credits) => match credits.refill {
                None => credits.remaining.to_string(),
                Some(refill) => format!("{} (refills {})", credits.remaining, refill.interval.as_text()),
            },
        };
        // The other key by its prefix where the table lists it too, else by its id.
        let other = |id: KeyId| prefixes.get(&id).map_or_else(|| id.to_string(), |prefix| format!("{prefix}…"));
        let rolled = match (key.rotated_from, key.replaced_by) {
            (_, Some(into)) => format!("into {}", other(into)),
            (Some(from), None) => format!("from {}", other(from)),
            (None, None) => String::new(),
        };
        let search = format!("{} {} {} {} {}", key.id, key.prefix, name, scopes.join(" "), owner).to_lowercase();
        Self {
            id: key.id.to_string(),
            prefix: key.prefix.to_string(),
            created: When::of(key.created_at),
            last_used: key.last_used_at.and_then(When::of),
            expires: key.expires_at.and_then(When::of),
            action_href: format!("{account_href}/keys/{}", key.id),
            name,
            scopes,
            owner,
            credits,
            rolled,
            search,
        }
    }
}

/// The key table's columns, which sort it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum SortBy {
    Prefix,
    Name,
    Owner,
    Created,
    LastUsed,
    Expires,
    Credits,
}

impl SortBy {
    /// Every column that sorts, by its `sort` parameter.
    const ALL: [(Self, &'static str); 7] = [
        (Self::Prefix, "prefix"),
        (Self::Name, "name"),
        (Self::Owner, "owner"),
        (Self::Created, "created"),
        (Self::LastUsed, "last_used"),
        (Self::Expires, "expires"),
        (Self::Credits, "credits"),
    ];

    /// The column a `sort` parameter names; the creation time for any other.
    pub(super) fn named(name: &str) -> Self {
        Self::ALL.iter().find(|(_, param)| *param == name).map_or(Self::Created, |(sort, _)| *sort)
    }

    fn param(self) -> &'static str {
        Self::ALL.iter().find(|(sort, _)| *sort == self).map_or("created", |(_, param)| param)
    }

    /// Sorts `keys` by this column, then by id so that the order is total.
    pub(super) fn sort(self, keys: &mut [ApiKey], descending: bool) {
        keys.sort_by(|a, b| {
            let order = match self {
                Self::Prefix => a.prefix.as_str().cmp(b.prefix.as_str()),
                Self::Name => a.name.as_ref().map(|n| n.as_str()).cmp(&b.name.as_ref().map(|n| n.as_str())),
                Self::Owner => a.owner.cmp(&b.owner),
                Self::Created => a.created_at.cmp(&b.created_at),
                Self::LastUsed => a.last_used_at.cmp(&b.last_used_at),
                // Keys that never expire sort after every expiry.
                Self::Expires => {
                    a.expires_at.is_none().cmp(&b.expires_at.is_none()).then(a.expires_at.cmp(&b.expires_at))
                }
                Self::Credits => {
                    let remaining = |key: &ApiKey| key.credits.map_or(u64::MAX, |credits| credits.remaining);
                    remaining(a).cmp(&remaining(b))
                }
            };
            let order = order.then(a.id.cmp(&b.id));
            if descending { order.reverse() } else { order }
        });
    }
}

/// A column head: its label, the link that sorts by it, and how it sorts the table now.
pub(super) struct Column {
    pub(super) label: &'static str,
    pub(super) href: Option<String>,
    pub(super) aria_sort: Option<&'static str>,
}

/// The key table's columns in their order, by label, with the order each sorts by, if any.
const COLUMNS: [(&str, Option<SortBy>); 9] = [
    ("Prefix", Some(SortBy::Prefix)),
    ("Name", Some(SortBy::Name)),
    ("Scopes", None),
    ("Owner", Some(SortBy::Owner)),
    ("Created", Some(SortBy::Created)),
    ("Last used", Some(SortBy::LastUsed)),
    ("Expires", Some(SortBy::Expires)),
    ("Credits left", Some(SortBy::Credits)),
    ("Rolled", None),
];

/// The heads of the key table sorted by `sorted`, each that sorts linking to the table sorted by
/// it (the sorted one, the other way round).
pub(super) fn columns(account_href: &str, sorted: SortBy, descending: bool, filter: &str) -> Vec<Column> {
    let column = |&(label, sort): &(&'static str, Option<SortBy>)| {
        let Some(sort) = sort else { return Column { label, href: None, aria_sort: None } };
        let dir = if sort == sorted && !descending { "desc" } else { "asc" };
        Column {
            label,
            href: Some(account_view_href(account_href, sort.param(), dir, filter, None)),
            aria_sort: (sort == sorted).then_some(if descending { "descending" } else { "ascending" }),
        }
    };
    COLUMNS.iter().map(column).collect()
}

/// The `sort` and `dir` parameters of the table's order.
pub(super) fn sort_params(sort: SortBy, descending: bool) -> (&'static str, &'static str) {
    (sort.param(), if descending { "desc" } else { "asc" })
}

pub(super) struct EventRow {
    pub(super) at: Option<When>,
    pub(super) action: &'static str,
    /// `good` or `bad`, for the action's colour.
    pub(super) tone: &'static str,
    pub(super) actor: String,
    pub(super) key: String,
    pub(super) detail: String,
}

impl EventRow {
    pub(super) fn of(event: &AuditEvent) -> Self {
        let tone = match event.action {
            Action::KeyCreated => "good",
            Action::KeyRevoked | Action::KeyLeaked => "bad",
            _ => "",
        };
        let detail = event.detail.iter().map(|(name, value)| format!("{name}: {value}")).collect::<Vec<_>>().join(", ");
        Self {
            at: When::of(event.at),
            action: event.action.as_str(),
            tone,
            actor: format!("{} {}", event.actor.kind().as_str(), event.actor.id()),
            key: event.key_id.map(|id| id.to_string()).unwrap_or_default(),
            detail,
        }
    }
}

#[derive(Template)]
#[template(path = "confirm.html")]
pub(super) struct ConfirmPage<'a> {
    pub(super) csrf: String,
    pub(super) account: &'a str,
    pub(super) prefix: String,
    pub(super) name: String,
    pub(super) action: String,
    pub(super) back: String,
}
