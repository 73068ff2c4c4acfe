//! Splitting lock URLs: the part every backend's URL parser shares.
//!
//! Lock URLs name several hosts (`zk://h1:2181,h2:2181/prefix`), which
//! general URL parsers refuse, so backends split them with these helpers
//! and parse hosts and options themselves.

/// The parts of a lock URL after `scheme://`:
/// `[userinfo@]hosts[/path][?query]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UrlParts<'a> {
    /// What precedes the last `@` of the authority, still percent-encoded.
    pub userinfo: Option<&'a str>,
    /// The comma-separated hosts (possibly empty).
    pub hosts: &'a str,
    /// From the first `/` after the authority, up to the query (possibly
    /// empty).
    pub path: &'a str,
    /// After the first `?`, if any.
    pub query: Option<&'a str>,
}

impl<'a> UrlParts<'a> {
    /// Splits what follows `scheme://`.
    ///
    /// ```
    /// use distlock_core::backend::url::UrlParts;
    /// let parts = UrlParts::split("u:p%40ss@h1:1,h2:2/app/locks?ttl=5s");
    /// assert_eq!(parts.userinfo, Some("u:p%40ss"));
    /// assert_eq!(parts.hosts, "h1:1,h2:2");
    /// assert_eq!(parts.path, "/app/locks");
    /// assert_eq!(parts.query, Some("ttl=5s"));
    /// ```
    pub fn split(after_scheme: &'a str) -> Self {
        let (rest, query) = match after_scheme.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (after_scheme, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        UrlParts {
            userinfo,
            hosts,
            path,
            query,
        }
    }
}

/// The `name=value` options of a URL's query, in order; empty pairs are
/// skipped and a pair without `=` is an error naming it. Values are still
/// percent-encoded.
///
/// ```
/// let options: Vec<_> = distlock_core::backend::url::options(Some("a=1&&b=2")).collect();
/// assert_eq!(options, [Ok(("a", "1")), Ok(("b", "2"))]);
/// assert!(distlock_core::backend::url::options(Some("flag")).next().unwrap().is_err());
/// ```
pub fn options(query: Option<&str>) -> impl Iterator<Item = Result<(&str, &str), String>> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once('=')
                .ok_or_else(|| format!("option {pair:?} has no value"))
        })
}

/// Decodes `%XX` escapes (RFC 3986; `+` stays `+`). `None` for a bad
/// escape or a result that is not UTF-8.
///
/// ```
/// assert_eq!(distlock_core::backend::url::percent_decode("p%40ss+word").as_deref(), Some("p@ss+word"));
/// assert_eq!(distlock_core::backend::url::percent_decode("bad%4"), None);
/// ```
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_every_part_or_none() {
        assert_eq!(
            UrlParts::split("h"),
            UrlParts {
                userinfo: None,
                hosts: "h",
                path: "",
                query: None
            }
        );
        let parts = UrlParts::split("a@b@h/p?x=1&&y&z=a=b");
        assert_eq!(parts.userinfo, Some("a@b"));
        assert_eq!(parts.hosts, "h");
        assert_eq!(parts.path, "/p");
        let pairs: Vec<_> = options(parts.query).collect();
        assert_eq!(
            pairs,
            [
                Ok(("x", "1")),
                Err("option \"y\" has no value".into()),
                Ok(("z", "a=b"))
            ]
        );
        // A `/` or `@` inside the query does not move the other parts.
        let parts = UrlParts::split("h?next=/a@b");
        assert_eq!((parts.userinfo, parts.hosts, parts.path), (None, "h", ""));
    }

    #[test]
    fn decoding_refuses_bad_escapes() {
        assert_eq!(percent_decode("%E2%9C%93").as_deref(), Some("✓"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%FF"), None);
        assert_eq!(percent_decode("%"), None);
    }
}
