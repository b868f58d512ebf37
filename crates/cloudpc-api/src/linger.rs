//! Lingering on refused request bodies, so that a client still sending gets to read the refusal.
//!
//! When a handler answers before reading the whole body (an upload over the size limit, a wrong
//! token, a bad query), the server would close a socket that still has unread bytes in it, and the
//! kernel then resets the connection. A client that is still writing (the CLI streaming a large
//! image) sees "connection reset" and never reads the 413 that was already on its way. Web servers
//! solve this with a "lingering close"; hyper has none, so this layer does it: a body dropped
//! before its end is read and thrown away for a while (bounded in time, in idle time and in how
//! many connections linger at once), and the answer says `Connection: close`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::{Stream, StreamExt};
use tokio::sync::Semaphore;

/// How long the rest of a refused body is read at most before the connection is dropped anyway.
pub const LINGER: Duration = Duration::from_secs(30);
/// A client that sends nothing for this long is not waiting to read anything either.
pub const LINGER_IDLE: Duration = Duration::from_secs(5);
/// At most this many connections linger at once; beyond that they are closed at once, as before.
pub const MAX_LINGERING: usize = 64;

static LINGERING: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(MAX_LINGERING)));

/// Middleware: wraps the request body so that dropping it early drains it in the background.
pub async fn drain_refused_bodies(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    // With `Expect: 100-continue` the client has not sent the body yet and waits for leave to:
    // reading it now would ask for the very bytes the refusal is about.
    let expects_continue = parts.headers.contains_key(header::EXPECT);
    if body.is_end_stream() || expects_continue {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let left_unread = Arc::new(AtomicBool::new(false));
    let body = Body::from_stream(Lingering {
        inner: Some(body.into_data_stream()),
        ended: false,
        left_unread: left_unread.clone(),
    });
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    if left_unread.load(Ordering::Relaxed) {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

struct Lingering {
    inner: Option<BodyDataStream>,
    ended: bool,
    left_unread: Arc<AtomicBool>,
}

impl Stream for Lingering {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let next = inner.poll_next_unpin(cx);
        if matches!(next, Poll::Ready(None | Some(Err(_)))) {
            self.ended = true;
        }
        next
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut rest) = self.inner.take().filter(|_| !self.ended) else { return };
        self.left_unread.store(true, Ordering::Relaxed);
        // Outside a runtime (never in the server) there is nothing to linger with.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let Ok(permit) = LINGERING.clone().try_acquire_owned() else { return };
        runtime.spawn(async move {
            let drain = async { while let Ok(Some(Ok(_))) = tokio::time::timeout(LINGER_IDLE, rest.next()).await {} };
            let _ = tokio::time::timeout(LINGER, drain).await;
            drop(permit);
        });
    }
}
