//! The egress proxy of agents with `network = "allowlist"`. Such an agent sits on an
//! internal Docker network (no route out, no DNS beyond container names, no traffic to
//! other containers); its only way out is a proxy Threadline runs for that one run, on
//! the network's gateway address, which lets through the hosts of its allowlist and
//! refuses the rest. Plain HTTP (absolute-form requests) and `CONNECT` (HTTPS) are
//! spoken; refusals are counted for the run's card, the dashboard and `/metrics`.
//!
//! The agent is untrusted: the request head is bounded, only the run's own container
//! may use its proxy, names are resolved here (pinned ones first), and an answer in a
//! private, loopback or link-local range is refused unless the operator pinned it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The internal network allowlisted agents are put on.
pub const NETWORK: &str = "threadline-egress";
/// The largest request head read from an agent.
const MAX_HEAD: usize = 16 * 1024;
/// The most distinct refused hosts remembered per run.
const MAX_HOSTS: usize = 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest an agent may take to send a whole request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one run's proxy serves at once; more wait for a free one.
const MAX_CONNECTIONS: usize = 64;

pub use crate::model::Blocked;

/// The allowlist of one run.
#[derive(Debug, Clone)]
pub struct Allowlist {
    hosts: Vec<String>,
    pins: BTreeMap<String, IpAddr>,
}

impl Allowlist {
    pub fn new(hosts: &[String], pins: &BTreeMap<String, String>) -> Allowlist {
        Allowlist {
            hosts: hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            pins: pins
                .iter()
                .filter_map(|(name, addr)| Some((name.to_ascii_lowercase(), addr.parse().ok()?)))
                .collect(),
        }
    }

    pub fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.hosts.iter().any(|allowed| match allowed.strip_prefix("*.") {
            Some(domain) => host.ends_with(&format!(".{domain}")),
            None => *allowed == host,
        })
    }

    /// Where an allowed host is: its pin, else the system's answer if it is public.
    async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, String> {
        if let Some(ip) = self.pins.get(&host.to_ascii_lowercase()) {
            return Ok(SocketAddr::new(*ip, port));
        }
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        found.into_iter().find(|a| public(a.ip())).ok_or_else(|| {
            format!("{host} resolves only to private addresses (pin it in [egress] resolve to allow that)")
        })
    }
}

/// Whether an address is on the public internet (not loopback, private, link-local,
/// shared, documentation or unspecified).
fn public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || o[0] >= 240
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19)))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
            let nat64 = (s[0], s[1], s[2], s[3], s[4], s[5]) == (0x64, 0xff9b, 0, 0, 0, 0);
            let embedded = std::net::Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0], s[1]) == (0x2001, 0xdb8)
                || (nat64 && !public(IpAddr::V4(embedded)))
                || v6.to_ipv4_mapped().is_some_and(|v4| !public(IpAddr::V4(v4))))
        }
    }
}

/// One run's proxy: serving until dropped.
pub struct RunProxy {
    pub addr: SocketAddr,
    client: watch::Sender<Option<IpAddr>>,
    blocked: Arc<Mutex<Blocked>>,
    stop: CancellationToken,
}

impl RunProxy {
    /// Listens on `gateway` (on `port`, or one the system chooses for 0) for the run's
    /// agent. `refused` is called with each refused host.
    pub async fn start(
        gateway: IpAddr,
        port: u16,
        allow: Allowlist,
        refused: impl Fn(&str, bool) + Send + Sync + 'static,
    ) -> std::io::Result<RunProxy> {
        let listener = TcpListener::bind((gateway, port)).await?;
        let addr = listener.local_addr()?;
        let (client, expected) = watch::channel(None);
        let blocked = Arc::new(Mutex::new(Blocked::default()));
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            allow,
            expected,
            blocked: blocked.clone(),
            refused: Box::new(refused),
        });
        let stopped = stop.clone();
        // Bounded: one agent holding connections open cannot take the daemon's file
        // descriptors (each tunnel holds two).
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let slot = tokio::select! {
                    _ = stopped.cancelled() => return,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => return,
                    },
                };
                let (conn, from) = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => {
                            // Out of descriptors, say: no busy loop.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let shared = shared.clone();
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    tokio::select! {
                        _ = stopped.cancelled() => {}
                        _ = serve(shared, conn, from) => {}
                    }
                });
            }
        });
        Ok(RunProxy {
            addr,
            client,
            blocked,
            stop,
        })
    }

    /// The agent's address on the internal network, once its container runs: only it
    /// is served (others wait for it, briefly, then are refused).
    pub fn set_client(&self, ip: IpAddr) {
        let _ = self.client.send(Some(ip));
    }

    pub fn blocked(&self) -> Blocked {
        self.blocked.lock().unwrap().clone()
    }
}

impl Drop for RunProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Called with each refused host, and whether it is that host's first refusal.
type Refused = Box<dyn Fn(&str, bool) + Send + Sync>;

struct Shared {
    allow: Allowlist,
    expected: watch::Receiver<Option<IpAddr>>,
    blocked: Arc<Mutex<Blocked>>,
    refused: Refused,
}

async fn serve(shared: Arc<Shared>, mut conn: TcpStream, from: SocketAddr) {
    // The run's container, and no other, may use its proxy.
    let own = {
        let mut expected = shared.expected.clone();
        let known = tokio::time::timeout(Duration::from_secs(10), expected.wait_for(|ip| ip.is_some())).await;
        matches!(known, Ok(Ok(ip)) if *ip == Some(from.ip()))
    };
    if !own {
        return;
    }
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut conn)).await;
    let Ok(Ok(Some((head, rest)))) = head else {
        let _ = answer(&mut conn, "400 Bad Request", "not an HTTP proxy request\n").await;
        return;
    };
    let Some(request) = Request::parse(&head) else {
        let _ = answer(&mut conn, "400 Bad Request", "not an HTTP proxy request\n").await;
        return;
    };
    if !shared.allow.allows(&request.host) {
        let first_of_host = {
            let mut blocked = shared.blocked.lock().unwrap();
            blocked.count += 1;
            blocked.hosts.len() < MAX_HOSTS
                && blocked
                    .hosts
                    .insert(crate::untrusted::prefix(&request.host, 253).to_owned())
        };
        // Counted every time; told (logged) once per host.
        (shared.refused)(&request.host, first_of_host);
        let body = format!(
            "Threadline's egress allowlist does not include {}; ask the operator to add it to `allow`\n",
            request.host
        );
        let _ = answer(&mut conn, "403 Forbidden", &body).await;
        return;
    }
    let upstream = match shared.allow.resolve(&request.host, request.port).await {
        Ok(addr) => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("{} did not answer", request.host))
            .and_then(|r| r.map_err(|e| format!("cannot reach {}: {e}", request.host))),
        Err(e) => Err(e),
    };
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            let _ = answer(&mut conn, "502 Bad Gateway", &format!("{e}\n")).await;
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if request.connect {
        if conn
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
    } else if upstream.write_all(request.forward.as_bytes()).await.is_err() {
        return;
    }
    if !rest.is_empty() && upstream.write_all(&rest).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
}

async fn answer(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(text.as_bytes()).await?;
    conn.shutdown().await
}

/// Reads up to the end of the request head: the head, and any bytes after it.
async fn read_head(conn: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok(String::from_utf8(buf).ok().map(|head| (head, rest)));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

/// A proxy request: `CONNECT host:port`, or an absolute-form request to forward.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    connect: bool,
    host: String,
    port: u16,
    /// For plain HTTP: the head to send upstream (origin-form, `Connection: close`).
    forward: String,
}

impl Request {
    fn parse(head: &str) -> Option<Request> {
        let mut lines = head.split("\r\n");
        let first = lines.next()?;
        let mut parts = first.split(' ');
        let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
            return None;
        }
        if method == "CONNECT" {
            let (host, port) = split_host_port(target, 443)?;
            return Some(Request {
                connect: true,
                host,
                port,
                forward: String::new(),
            });
        }
        let rest = target.strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return None;
        }
        let (host, port) = split_host_port(authority, 80)?;
        let mut forward = format!("{method} {path} {version}\r\n");
        for line in lines.filter(|l| !l.is_empty()) {
            let name = line.split(':').next().unwrap_or_default().trim().to_ascii_lowercase();
            if matches!(
                name.as_str(),
                "proxy-connection" | "connection" | "proxy-authorization" | "keep-alive"
            ) {
                continue;
            }
            forward.push_str(line);
            forward.push_str("\r\n");
        }
        forward.push_str("Connection: close\r\n\r\n");
        Some(Request {
            connect: false,
            host,
            port,
            forward,
        })
    }
}

/// `host[:port]` (a bracketed IPv6 literal too), lower-cased, the host checked to be a
/// name or an address.
fn split_host_port(authority: &str, default: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default,
            None => return None,
        };
        (host.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().ok()?),
            None => (authority.to_owned(), default),
        }
    };
    let host = host.to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':'));
    (valid && port != 0).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_strictly() {
        let r = Request::parse("CONNECT api.example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!((r.connect, r.host.as_str(), r.port), (true, "api.example.com", 443));
        let r = Request::parse(
            "GET http://Server.Test/ok?x=1 HTTP/1.1\r\nHost: server.test\r\nProxy-Connection: keep-alive\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.host.as_str(), r.port), ("server.test", 80));
        assert_eq!(
            r.forward,
            "GET /ok?x=1 HTTP/1.1\r\nHost: server.test\r\nConnection: close\r\n\r\n"
        );
        for bad in [
            "GET /relative HTTP/1.1\r\n\r\n",
            "GET http://user@host/ HTTP/1.1\r\n\r\n",
            "CONNECT host:0 HTTP/1.1\r\n\r\n",
            "CONNECT ho\u{1b}st:443 HTTP/1.1\r\n\r\n",
            "GET ftp://host/ HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(Request::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn allowlists_match_names_and_subdomains_only() {
        let allow = Allowlist::new(&["api.anthropic.com".into(), "*.example.com".into()], &BTreeMap::new());
        assert!(allow.allows("API.anthropic.com"));
        assert!(allow.allows("a.b.example.com"));
        assert!(!allow.allows("example.com"));
        assert!(!allow.allows("api.anthropic.com.evil.test"));
        assert!(!allow.allows("evilexample.com"));
        assert!(public("1.1.1.1".parse().unwrap()));
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.18.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "198.18.0.1",
            "240.0.0.1",
            "192.0.2.1",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2001:db8::1",
        ] {
            assert!(!public(private.parse().unwrap()), "{private}");
        }
    }
}
