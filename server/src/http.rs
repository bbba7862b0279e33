//! The operator's plain-HTTP endpoint on `listen.metrics`: `GET /metrics` (Prometheus text
//! format), `GET /health` (200 while the process runs) and `GET /ready` (200 when the node can
//! serve, 503 otherwise).
//!
//! A deliberately tiny HTTP/1.1 responder: it reads one request head, answers and closes the
//! connection (`Connection: close`), which is all a Prometheus scraper, a load balancer's health
//! check or `curl` needs. Limits: a request head of at most [`HEAD_BYTES_MAX`] bytes (else 431),
//! [`READ_TIMEOUT`] to send it (else 408), [`METRICS_CONNECTIONS_MAX`] connections at once (beyond that
//! a new one is closed unanswered). A request body is never read.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::limits::{ACCEPT_PAUSE_MS, METRICS_CONNECTIONS_MAX};
use crate::metrics::Metrics;

pub const HEAD_BYTES_MAX: usize = 8 * 1024;
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the endpoint until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    explorer: Option<Arc<crate::explorer::Explorer>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(METRICS_CONNECTIONS_MAX));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else {
                    // Out of descriptors (or another accept error): wait as the client port
                    // does, instead of retrying in a tight loop.
                    tokio::time::sleep(std::time::Duration::from_millis(ACCEPT_PAUSE_MS))
                        .await;
                    continue;
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::debug!("metrics connection refused: {METRICS_CONNECTIONS_MAX} open");
                    continue;
                };
                let metrics = metrics.clone();
                let explorer = explorer.clone();
                tokio::spawn(async move {
                    answer(stream, &metrics, explorer.as_deref()).await;
                    drop(slot);
                });
            }
        }
    }
}

async fn answer(
    mut stream: TcpStream,
    metrics: &Metrics,
    explorer: Option<&crate::explorer::Explorer>,
) {
    let mut buf = Vec::with_capacity(1024);
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream, &mut buf)).await
    {
        Ok(Ok(Head::Complete(len))) => match (explorer, explorer_target(&buf[..len])) {
            (Some(explorer), Some(target)) => {
                let page = explorer.get(&target).await;
                Response {
                    status: page.status,
                    content_type: page.content_type,
                    body: page.body,
                    head_only: false,
                }
            }
            _ => route(&buf[..len], metrics),
        },
        Ok(Ok(Head::TooLarge)) => Response::text(431, "request header fields too large\n"),
        Ok(Ok(Head::Closed)) | Ok(Err(_)) => return,
        Err(_) => Response::text(408, "request timeout\n"),
    };
    let bytes = response.encode();
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
}

enum Head {
    /// The head ends at this offset (after the blank line).
    Complete(usize),
    TooLarge,
    /// The peer closed before sending a whole head.
    Closed,
}

async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Head> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Head::Complete(end + 4));
        }
        if buf.len() >= HEAD_BYTES_MAX {
            return Ok(Head::TooLarge);
        }
        let mut chunk = [0u8; 1024];
        let room = (HEAD_BYTES_MAX - buf.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One response, always followed by closing the connection.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// HEAD: headers as for GET, no body.
    pub head_only: bool,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            head_only: false,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "",
        };
        let allow = if self.status == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// The target of a `GET /explorer...` request head, if it is one.
fn explorer_target(head: &[u8]) -> Option<String> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    (method == "GET" && target.starts_with("/explorer")).then(|| target.to_string())
}

/// Answers one request head (request line and headers, ending with the blank line).
pub fn route(head: &[u8], metrics: &Metrics) -> Response {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return Response::text(400, "bad request\n");
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "bad request\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(400, "bad request\n");
    }
    let path = target.split('?').next().unwrap_or_default();
    let mut response = match path {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics.encode().into_bytes(),
            head_only: false,
        },
        "/health" => Response::text(200, "ok\n"),
        "/ready" if metrics.is_ready() => Response::text(200, "ready\n"),
        "/ready" => Response::text(503, "not ready\n"),
        _ => return Response::text(404, "not found: try /metrics, /health or /ready\n"),
    };
    match method {
        "GET" => response,
        "HEAD" => {
            response.head_only = true;
            response
        }
        _ => Response::text(405, "method not allowed: use GET\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(head: &str, status: u16, body_contains: &str) {
        let metrics = Metrics::new();
        metrics.set_ready(true);
        let r = route(head.as_bytes(), &metrics);
        assert_eq!(r.status, status, "{head:?}");
        let body = String::from_utf8(r.body).unwrap();
        assert!(body.contains(body_contains), "{head:?}: {body}");
    }

    #[test]
    fn routes() {
        check(
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            200,
            "tally_applied_height 0",
        );
        check(
            "GET /metrics?x=1 HTTP/1.0\r\n\r\n",
            200,
            "# TYPE tally_stage_seconds histogram",
        );
        check("GET /health HTTP/1.1\r\n\r\n", 200, "ok");
        check("GET /ready HTTP/1.1\r\n\r\n", 200, "ready");
        check("HEAD /health HTTP/1.1\r\n\r\n", 200, "ok");
        check("POST /metrics HTTP/1.1\r\n\r\n", 405, "");
        check("GET / HTTP/1.1\r\n\r\n", 404, "");
        check("GET /metrics/x HTTP/1.1\r\n\r\n", 404, "");
        check("GET /metrics HTTP/2\r\n\r\n", 400, "");
        check("GET /metrics\r\n\r\n", 400, "");
        check("\u{0}\u{ff}\r\n\r\n", 400, "");
    }

    #[test]
    fn not_ready_is_503_and_head_has_no_body() {
        let metrics = Metrics::new();
        assert_eq!(route(b"GET /ready HTTP/1.1\r\n\r\n", &metrics).status, 503);
        let head = route(b"HEAD /health HTTP/1.1\r\n\r\n", &metrics).encode();
        let text = String::from_utf8(head).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }
}
