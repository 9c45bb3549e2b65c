//! A loopback HTTP proxy in front of moto that makes it behave like the parts of EC2 moto does not model:
//! it can ignore every `Filter.N` of a Describe call (so only nimbus's own second filter stands between a
//! tenant and another's resources), and it can answer with `RequestLimitExceeded` (EC2's throttling) for
//! the next N requests. It records each request's `Action`. Loopback only.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct ProxyState {
    pub ignore_filters: bool,
    pub throttle_next: u32,
    pub actions: Vec<String>,
    pub throttled: u32,
    /// Every request's form body, in order.
    pub bodies: Vec<String>,
    /// AllocateHosts in this zone answers `InsufficientHostCapacity`, as EC2 does when a zone has no Mac hosts.
    pub refuse_zone: Option<String>,
    /// Responses carry a `Date` this many seconds off (a provider whose clock is wrong).
    pub date_skew_secs: Option<i64>,
}

pub struct Ec2Proxy {
    pub url: String,
    pub state: Arc<Mutex<ProxyState>>,
}

impl Ec2Proxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> Ec2Proxy {
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
        assert!(upstream.starts_with("127."), "the proxy forwards to loopback only");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state: Arc<Mutex<ProxyState>> = Arc::default();
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (st, up) = (st.clone(), upstream.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &up, &st);
                });
            }
        });
        Ec2Proxy { url, state }
    }

    pub fn set(&self, f: impl FnOnce(&mut ProxyState)) {
        f(&mut self.state.lock().unwrap());
    }

    /// How many requests of `action` went through (throttled ones included).
    pub fn count(&self, action: &str) -> usize {
        self.state.lock().unwrap().actions.iter().filter(|a| *a == action).count()
    }
}

fn serve(client: TcpStream, upstream: &str, st: &Mutex<ProxyState>) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    {
        // Request line and headers.
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(()); // the client closed the connection
            }
            if line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_string());
        }
        let len: usize = head
            .iter()
            .find_map(|h| h.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
            .map(|(_, v)| v.trim().parse().unwrap())
            .unwrap_or(0);
        assert!(
            !head.iter().any(|h| h.to_ascii_lowercase().starts_with("transfer-encoding")),
            "the proxy expects Content-Length bodies"
        );
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        let mut form = String::from_utf8_lossy(&body).into_owned();
        let action = form.split('&').find_map(|kv| kv.strip_prefix("Action=")).unwrap_or("?").to_string();
        let (throttle, ignore) = {
            let mut s = st.lock().unwrap();
            s.actions.push(action.clone());
            s.bodies.push(form.clone());
            let t = s.throttle_next > 0;
            if t {
                s.throttle_next -= 1;
                s.throttled += 1;
            }
            (t, s.ignore_filters)
        };
        let refused = st.lock().unwrap().refuse_zone.as_ref().is_some_and(|z| {
            action == "AllocateHosts" && form.split('&').any(|kv| kv == format!("AvailabilityZone={z}"))
        });
        if refused {
            let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>InsufficientHostCapacity</Code><Message>Insufficient capacity.</Message></Error></Errors><RequestID>nimbus-proxy</RequestID></Response>";
            write!(
                client,
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                xml.len()
            )?;
            client.flush()?;
            return Ok(());
        }
        if throttle {
            let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>nimbus-proxy</RequestID></Response>";
            write!(
                client,
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                xml.len()
            )?;
            client.flush()?;
            return Ok(());
        }
        if ignore {
            form = form.split('&').filter(|kv| !kv.starts_with("Filter.")).collect::<Vec<_>>().join("&");
        }
        let mut up = TcpStream::connect(upstream)?;
        let mut req = format!("{}\r\n", head[0]);
        for h in &head[1..] {
            let k = h.split(':').next().unwrap_or("").to_ascii_lowercase();
            if k != "content-length" && k != "connection" {
                req.push_str(h);
                req.push_str("\r\n");
            }
        }
        req.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", form.len()));
        up.write_all(req.as_bytes())?;
        up.write_all(form.as_bytes())?;
        let mut resp = Vec::new();
        up.read_to_end(&mut resp)?;
        if let Some(skew) = st.lock().unwrap().date_skew_secs
            && let Some(end) = resp.windows(4).position(|w| w == b"\r\n\r\n")
        {
            let head = String::from_utf8_lossy(&resp[..end]).to_string();
            let date = (chrono::Utc::now() + chrono::Duration::seconds(skew)).to_rfc2822().replace("+0000", "GMT");
            let head: String =
                head.split("\r\n")
                    .map(|l| {
                        if l.to_ascii_lowercase().starts_with("date:") {
                            format!("Date: {date}")
                        } else {
                            l.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\r\n");
            let mut out = head.into_bytes();
            out.extend_from_slice(&resp[end..]);
            resp = out;
        }
        // Tell the client this connection ends here, so it never reuses it.
        if let Some(end) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&resp[..end]).to_ascii_lowercase();
            if !head.contains("\r\nconnection:") {
                resp.splice(end..end, b"\r\nConnection: close".iter().copied());
            }
        }
        client.write_all(&resp)?;
        client.flush()?;
        // The upstream closed; so does this connection (its response says `Connection: close`).
        Ok(())
    }
}
