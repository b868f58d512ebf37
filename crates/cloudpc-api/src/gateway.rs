//! The desktop gateway: a WebSocket that relays the browser's VNC stream to the Cloud PC's console.
//!
//! It is the only way in: consoles listen on their host's loopback, reached directly for a host
//! in this process and through the host's agent otherwise. The WebSocket carries no bearer
//! token (browsers cannot set one), so it is opened with a single-use ticket from
//! `POST cloudPCs/{id}/getConsoleTicket`; the ticket is checked before the upgrade. The relay ends
//! when either side closes, or when the Cloud PC is deprovisioned, reprovisioned or powered off.

use std::time::Instant;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use cloudpc_control::{Actor, App};
use cloudpc_hypervisor::ConsoleStream;
use cloudpc_types::provisioning::CloudPcRecord;

use crate::error::ApiError;

#[derive(Deserialize)]
pub struct TicketQuery {
    ticket: String,
}

/// `GET /gateway/console?ticket=...` (WebSocket, subprotocol `binary` as noVNC asks).
pub async fn console(State(app): State<App>, Query(q): Query<TicketQuery>, ws: WebSocketUpgrade) -> Response {
    let (actor, rec, vnc) = match app.redeem_console_ticket(&q.ticket).await {
        Ok(v) => v,
        Err(cloudpc_control::Error::Conflict(m)) if m.starts_with("the console did not open") => {
            return ApiError::new(StatusCode::BAD_GATEWAY, "BadGateway", m).into_response()
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    ws.protocols(["binary"]).on_upgrade(move |socket| relay(app, actor, rec, socket, vnc))
}

async fn relay(app: App, actor: Actor, rec: CloudPcRecord, ws: WebSocket, vnc: Box<dyn ConsoleStream>) {
    // Listening for a close starts before anything else, so none is missed.
    let closer = app.console_closer(rec.pc.id);
    let mut closed = Box::pin(closer.notified());
    closed.as_mut().enable();
    app.audit_console(&actor, &rec, true, None).await;
    let started = Instant::now();
    let in_use = tokio::spawn({
        let app = app.clone();
        let id = rec.pc.id;
        async move { app.keep_console_in_use(id).await }
    });
    pump(closed.as_mut(), ws, vnc).await;
    in_use.abort();
    app.console_closed(rec.pc.id).await;
    drop(closed);
    drop(closer);
    // The relay's notifier is gone now: the registry forgets the Cloud PC if none is left open.
    app.console_released(rec.pc.id);
    app.audit_console(&actor, &rec, false, Some(started.elapsed())).await;
}

/// Moves bytes both ways until either side closes or the Cloud PC's consoles are closed.
async fn pump(
    mut closed: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    mut ws: WebSocket,
    mut vnc: Box<dyn ConsoleStream>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            _ = &mut closed => {
                let _ = ws.send(Message::Close(None)).await;
                break;
            }
            n = vnc.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
            },
            msg = ws.recv() => match msg {
                Some(Ok(Message::Binary(data))) => {
                    if vnc.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if vnc.write_all(text.as_bytes()).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            },
        }
    }
}
