//! A probe's HTTP, as plain data: the URL ([`Target::parse`]), the request
//! ([`Target::request`]), the response head ([`parse_head`]) and what it
//! means ([`verdict`]: only `HTTP/1.x 200` is a success). No I/O.

use vane_policy::engine::ProbeResult;

/// The most of the response that is read: the status line and the
/// headers must end within it (the body is never read).
pub const MAX_HEAD: usize = 16 * 1024;

/// The most response headers accepted.
const MAX_HEADERS: usize = 64;

/// What a probe URL asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    /// The host to resolve or connect to (an IPv6 literal without
    /// brackets).
    pub host: String,
    pub port: u16,
    /// The `Host` header: the URL's authority as written.
    pub authority: String,
    /// Path and query; `/` when the URL has none.
    pub path: String,
}

impl Target {
    /// Parses an `http://` or `https://` URL (the rule file's parser has
    /// already checked the scheme and that a host follows).
    pub fn parse(url: &str) -> Result<Target, String> {
        Self::parse_inner(url)
    }

    /// The URL again, as it is requested.
    pub fn url(&self) -> String {
        format!(
            "{}://{}{}",
            if self.tls { "https" } else { "http" },
            self.authority,
            self.path
        )
    }

    fn parse_inner(url: &str) -> Result<Target, String> {
        if url.contains('#') {
            return Err("a probe URL cannot have a fragment (#)".into());
        }
        let uri: http::Uri = url.parse().map_err(|e| format!("not a valid URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => false,
            Some(s) if s.eq_ignore_ascii_case("https") => true,
            _ => return Err("the scheme must be http:// or https://".into()),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| "the URL has no host".to_owned())?;
        if authority.as_str().contains('@') {
            return Err("a probe URL cannot carry a user name or password".into());
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        // The port as written (http::Uri's own `port()` is `None` for one
        // that does not fit 16 bits, which must not mean the default).
        let after_host = authority
            .as_str()
            .rsplit_once(']')
            .map_or(authority.as_str(), |(_, rest)| rest);
        let port = match after_host.rsplit_once(':').map(|(_, p)| p) {
            None if tls => 443,
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))?,
        };
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/");
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        Ok(Target {
            tls,
            host: host.to_ascii_lowercase(),
            port,
            authority: authority.as_str().to_owned(),
            path,
        })
    }

    /// The request: a GET that asks the server to close afterwards.
    pub fn request(&self) -> Vec<u8> {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: vaned/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path,
            self.authority,
            env!("CARGO_PKG_VERSION")
        )
        .into_bytes()
    }
}

/// What the bytes read so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// More is needed.
    Partial,
    /// A complete, well-formed response head with this status, and the
    /// headers a captive portal check reads.
    Status {
        code: u16,
        reason: String,
        /// `Location` (a redirect's target), printable ASCII only.
        location: Option<String>,
        /// `Content-Length`, when given and a number.
        content_length: Option<u64>,
    },
    /// Not an HTTP/1.x response head, or one larger than [`MAX_HEAD`].
    Invalid(String),
}

/// Parses the response head read so far (httparse: HTTP/1.0 and 1.1
/// only, strict grammar).
pub fn parse_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(_)) => match response.code {
            Some(code) => {
                let header = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .map(str::trim)
                };
                Head::Status {
                    code,
                    reason: printable(response.reason.unwrap_or("")),
                    location: header("location")
                        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_graphic()))
                        .map(str::to_owned),
                    content_length: header("content-length").and_then(|l| l.parse().ok()),
                }
            }
            None => Head::Invalid("no status code".into()),
        },
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            Head::Invalid(format!("the response head is longer than {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(e) => Head::Invalid(format!("not an HTTP/1.x response: {e}")),
    }
}

/// A server's reason phrase as it may be shown: printable ASCII, at most
/// 64 characters.
fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// A probe's result and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub result: ProbeResult,
    pub detail: String,
}

impl Outcome {
    pub(super) fn fail(detail: impl Into<String>) -> Outcome {
        Outcome {
            result: ProbeResult::Fail,
            detail: detail.into(),
        }
    }
}

/// Only `HTTP/1.x 200` is a success.
pub fn verdict(head: &Head) -> Outcome {
    match head {
        Head::Status { code: 200, .. } => Outcome {
            result: ProbeResult::Ok,
            detail: "HTTP 200".into(),
        },
        Head::Status { code, reason, .. } if reason.is_empty() => {
            Outcome::fail(format!("HTTP {code}"))
        }
        Head::Status { code, reason, .. } => Outcome::fail(format!("HTTP {code} {reason:?}")),
        Head::Invalid(why) => Outcome::fail(format!("malformed response: {why}")),
        Head::Partial => Outcome::fail("the connection closed before the response head ended"),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_host_port_and_path() {
        let t = Target::parse("http://intranet.Corp.example.com/health?x=1").unwrap();
        assert_eq!(
            t,
            Target {
                tls: false,
                host: "intranet.corp.example.com".into(),
                port: 80,
                authority: "intranet.Corp.example.com".into(),
                path: "/health?x=1".into(),
            }
        );
        let t = Target::parse("HTTPS://[fd00::1]:8443").unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port), ("fd00::1", 8443));
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("[fd00::1]:8443", "/")
        );
        assert_eq!(Target::parse("https://h/").unwrap().port, 443);
        for bad in [
            "http://user:pw@host/",
            "http://host/#frag",
            "ftp://host/",
            "http://host:/",
            "http://host:0/",
            "http://host:99999/",
            "http:///path",
            "http://ho st/",
            "not a url",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_request_is_a_plain_get_that_closes() {
        let t = Target::parse("http://192.0.2.2:8080/ok").unwrap();
        assert_eq!(
            String::from_utf8(t.request()).unwrap(),
            format!(
                "GET /ok HTTP/1.1\r\nHost: 192.0.2.2:8080\r\nUser-Agent: vaned/{}\r\n\
                 Accept: */*\r\nConnection: close\r\n\r\n",
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[test]
    fn only_a_complete_http_1_200_head_succeeds() {
        let ok = |b: &[u8]| verdict(&parse_head(b));
        assert_eq!(ok(b"HTTP/1.1 200 OK\r\n\r\n").result, ProbeResult::Ok);
        assert_eq!(
            ok(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").result,
            ProbeResult::Ok
        );
        assert_eq!(ok(b"HTTP/1.1 200 OK\r\n\r\n").detail, "HTTP 200");
        assert_eq!(
            ok(b"HTTP/1.1 404 Not Found\r\n\r\n").detail,
            "HTTP 404 \"Not Found\""
        );
        assert_eq!(
            ok(b"HTTP/1.1 302 \r\nLocation: /x\r\n\r\n").result,
            ProbeResult::Fail
        );
        assert_eq!(ok(b"HTTP/1.1 204 \r\n\r\n").detail, "HTTP 204");
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nServer: x\r\n"),
            Head::Partial
        );
        assert_eq!(parse_head(b"HTT"), Head::Partial);
        for bad in [
            &b"HTTP/2 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"\x16\x03\x01\x00",
        ] {
            let head = parse_head(bad);
            assert!(matches!(head, Head::Invalid(_)), "{bad:?}: {head:?}");
            assert_eq!(verdict(&head).result, ProbeResult::Fail);
        }
        // A head that never ends within the bound.
        let mut long = b"HTTP/1.1 200 OK\r\n".to_vec();
        while long.len() < MAX_HEAD {
            long.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(matches!(parse_head(&long), Head::Invalid(_)));
        // A reason phrase is shown printable and bounded.
        let head = parse_head(b"HTTP/1.1 500 \xff\xfe oops\r\n\r\n");
        assert!(matches!(head, Head::Status { code: 500, .. }), "{head:?}");
    }
}
