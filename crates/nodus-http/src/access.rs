//! Who may use the HTTP listener, decided in one place: loopback peers may do everything;
//! beyond loopback every request needs the node's bearer token, except gateway routes the
//! operator marks public. A token that is not the node's is refused on the node's own routes
//! (dashboard, API, metrics) wherever it comes from. Pure: no I/O, no clock.
//!
//! The token is presented as `Authorization: Bearer <token>`, as the `nodus_token` cookie (set
//! by the dashboard page when opened with `?access_token=<token>`), or as the `access_token`
//! query parameter on the dashboard and API routes (RFC 6750 section 2.3), so a browser can
//! open the dashboard from another host. Tokens are compared in constant time.

use std::net::{IpAddr, SocketAddr};

/// The cookie that carries the token for browsers.
pub const TOKEN_COOKIE: &str = "nodus_token";
/// The query parameter that carries the token for browsers.
pub const TOKEN_QUERY: &str = "access_token";

/// A gateway route open to anyone: every event of an app, or one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicRoute {
    /// The app.
    pub app: String,
    /// One event, or `None` for every event of the app.
    pub event: Option<String>,
}

impl std::str::FromStr for PublicRoute {
    type Err = String;

    /// `APP` or `APP/EVENT`.
    fn from_str(s: &str) -> Result<PublicRoute, String> {
        let bad = || format!("public route {s:?}: write APP or APP/EVENT");
        let (app, event) = match s.split_once('/') {
            Some((a, e)) => (a, Some(e)),
            None => (s, None),
        };
        let ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
        if !ok(app) || event.is_some_and(|e| !ok(e)) {
            return Err(bad());
        }
        Ok(PublicRoute { app: app.to_string(), event: event.map(str::to_string) })
    }
}

/// The access policy of one listener.
#[derive(Clone, Default)]
pub struct Policy {
    token: Option<Vec<u8>>,
    public: Vec<PublicRoute>,
    token_on_loopback: bool,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("public", &self.public)
            .finish()
    }
}

/// What the policy decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed without a token (loopback peer or public route).
    Open,
    /// Allowed because it presented the node's token.
    Token,
    /// Refused: no token, or the wrong one.
    Refused(Refusal),
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request carried no token.
    Missing,
    /// The request carried a token that is not the node's.
    Wrong,
    /// The node has no token configured, so nothing beyond loopback is open but public routes.
    NotConfigured,
}

impl Refusal {
    /// A sentence for the client.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => {
                "a bearer token is required beyond loopback: send Authorization: Bearer <token> (the node's auth.token)"
            }
            Refusal::Wrong => "the bearer token is not this node's token",
            Refusal::NotConfigured => {
                "this node has no HTTP token configured, so only public gateway routes are open beyond loopback"
            }
        }
    }
}

/// What the policy needs to know about a request.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The app and event, for a gateway request.
    pub gateway: Option<(&'a str, &'a str)>,
    /// The token the request presented, if any.
    pub token: Option<&'a [u8]>,
}

impl Policy {
    /// A policy with the node's token (`None`: nothing but loopback and public routes) and the
    /// public gateway routes.
    pub fn new(token: Option<String>, public: Vec<PublicRoute>) -> Policy {
        Policy { token: token.filter(|t| !t.is_empty()).map(String::into_bytes), public, token_on_loopback: false }
    }

    /// Requires the token from loopback peers too: for a node behind a reverse proxy on the same
    /// host, where every request comes from loopback.
    pub fn token_on_loopback(mut self, yes: bool) -> Policy {
        self.token_on_loopback = yes;
        self
    }

    /// Whether a token is configured.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Decides one request.
    pub fn decide(&self, ask: Ask<'_>) -> Decision {
        if let (Some(expected), Some(given)) = (&self.token, ask.token) {
            if constant_time_eq(expected, given) {
                return Decision::Token;
            }
        }
        // On the node's own routes a token that is not the node's is refused even from
        // loopback, so a mistyped or stale token says so instead of acting as anonymous. Gateway
        // routes leave other tokens to the app (it may do its own bearer authentication).
        if ask.gateway.is_none() && self.token.is_some() && ask.token.is_some() {
            return Decision::Refused(Refusal::Wrong);
        }
        if !self.token_on_loopback && is_loopback(ask.peer.ip()) {
            return Decision::Open;
        }
        if let Some((app, event)) = ask.gateway {
            let covers = |r: &PublicRoute| r.app == app && r.event.as_ref().is_none_or(|e| e == event);
            if self.public.iter().any(covers) {
                return Decision::Open;
            }
        }
        Decision::Refused(match (&self.token, ask.token) {
            (None, _) => Refusal::NotConfigured,
            (Some(_), None) => Refusal::Missing,
            (Some(_), Some(_)) => Refusal::Wrong,
        })
    }

    /// Whether `given` is the node's token (constant time).
    pub fn is_token(&self, given: &[u8]) -> bool {
        self.token.as_deref().is_some_and(|t| constant_time_eq(t, given))
    }
}

/// True for 127.0.0.0/8, `::1` and IPv4-mapped loopback.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Compares two byte strings in time that depends only on their lengths (the token's length is
/// not secret: it is always 64 hex characters).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token in an `Authorization` header value: `Bearer <token>` (scheme case-insensitive).
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
    scheme.eq_ignore_ascii_case(b"bearer").then(|| rest.trim_ascii()).filter(|t| !t.is_empty())
}

/// The value of cookie `name` in a `Cookie` header value.
pub fn cookie<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    header.split(|b| *b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|b| *b == b'=')?;
        (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
    })
}

/// A `Cookie` header value without cookie `name`, or `None` when nothing else is left.
pub fn without_cookie(header: &[u8], name: &str) -> Option<Vec<u8>> {
    let kept: Vec<&[u8]> = header
        .split(|b| *b == b';')
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| pair.split(|b| *b == b'=').next().map(<[u8]>::trim_ascii) != Some(name.as_bytes()))
        .collect();
    (!kept.is_empty()).then(|| kept.join(&b"; "[..]))
}

/// The value of query parameter `name` (not percent-decoded: tokens are hex).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "ab12";

    fn ask<'a>(peer: &str, gateway: Option<(&'a str, &'a str)>, token: Option<&'a [u8]>) -> Ask<'a> {
        Ask { peer: peer.parse().unwrap(), gateway, token }
    }

    fn policy() -> Policy {
        Policy::new(Some(TOKEN.into()), vec!["shop".parse().unwrap(), "blog/read".parse().unwrap()])
    }

    #[test]
    fn loopback_is_open_without_a_token() {
        let p = policy();
        for peer in ["127.0.0.1:1", "127.9.9.9:1", "[::1]:1", "[::ffff:127.0.0.1]:1"] {
            assert_eq!(p.decide(ask(peer, None, None)), Decision::Open, "{peer}");
        }
        // A wrong token is refused there too on the node's routes, not on an app's.
        assert_eq!(p.decide(ask("127.0.0.1:1", None, Some(b"nope"))), Decision::Refused(Refusal::Wrong));
        assert_eq!(p.decide(ask("127.0.0.1:1", Some(("shop", "x")), Some(b"app's own"))), Decision::Open);
    }

    #[test]
    fn beyond_loopback_a_token_is_needed_except_for_public_routes() {
        let p = policy();
        let far = "10.1.2.3:5000";
        assert_eq!(p.decide(ask(far, None, None)), Decision::Refused(Refusal::Missing));
        assert_eq!(p.decide(ask(far, None, Some(b"nope"))), Decision::Refused(Refusal::Wrong));
        assert_eq!(p.decide(ask(far, None, Some(b"ab13"))), Decision::Refused(Refusal::Wrong));
        assert_eq!(p.decide(ask(far, None, Some(TOKEN.as_bytes()))), Decision::Token);
        assert_eq!(p.decide(ask(far, Some(("shop", "any")), None)), Decision::Open);
        assert_eq!(p.decide(ask(far, Some(("blog", "read")), None)), Decision::Open);
        assert_eq!(p.decide(ask(far, Some(("blog", "write")), None)), Decision::Refused(Refusal::Missing));
        assert_eq!(p.decide(ask("[2001:db8::1]:1", Some(("other", "x")), None)), Decision::Refused(Refusal::Missing));
        let none = Policy::new(None, vec![]);
        assert_eq!(none.decide(ask(far, None, Some(b"x"))), Decision::Refused(Refusal::NotConfigured));
        assert_eq!(
            Policy::new(Some(String::new()), vec![]).decide(ask(far, None, Some(b""))),
            Decision::Refused(Refusal::NotConfigured)
        );
    }

    #[test]
    fn loopback_can_be_made_to_need_the_token() {
        let p = policy().token_on_loopback(true);
        assert_eq!(p.decide(ask("127.0.0.1:1", None, None)), Decision::Refused(Refusal::Missing));
        assert_eq!(p.decide(ask("127.0.0.1:1", None, Some(TOKEN.as_bytes()))), Decision::Token);
        assert_eq!(p.decide(ask("127.0.0.1:1", Some(("shop", "x")), None)), Decision::Open);
    }

    #[test]
    fn public_routes_parse_strictly() {
        assert_eq!("a".parse::<PublicRoute>().unwrap(), PublicRoute { app: "a".into(), event: None });
        assert_eq!("a/b".parse::<PublicRoute>().unwrap().event.as_deref(), Some("b"));
        for bad in ["", "/b", "a/", "a/b/c", "a b"] {
            assert!(bad.parse::<PublicRoute>().is_err(), "{bad}");
        }
    }

    #[test]
    fn token_carriers_are_parsed() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(cookie(b"a=1; nodus_token=xyz; b=2", TOKEN_COOKIE), Some(&b"xyz"[..]));
        assert_eq!(cookie(b"a=1", TOKEN_COOKIE), None);
        assert_eq!(without_cookie(b"a=1; nodus_token=xyz; b=2", TOKEN_COOKIE).unwrap(), b"a=1; b=2");
        assert_eq!(without_cookie(b"nodus_token=xyz", TOKEN_COOKIE), None);
        assert_eq!(query_param("x=1&access_token=t0k", TOKEN_QUERY), Some("t0k"));
        assert_eq!(query_param("x=1", TOKEN_QUERY), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
