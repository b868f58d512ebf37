//! Gateway benchmark: cloudpc's desktop gateway against websockify (PyPI), both relaying the same
//! QEMU VNC server of a real tiny Cloud PC, in one run. Prints throughput (full-screen raw
//! framebuffer updates), added round-trip latency over a direct TCP connection, and the
//! gateway's memory for 1,000 idle sessions. Asserts nothing.
//!
//! Run (needs a raised file limit for the 1,000 sessions):
//! `ulimit -n 8192; CLOUDPC_TEST_GALLERY=/var/lib/cloudpc/gallery cargo bench --bench gateway`
#![allow(dead_code)]

#[path = "../tests/integration/support.rs"]
mod support;
#[path = "../tests/integration/vm_support.rs"]
mod vm_support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use support::VE;
use vm_support::VmServer;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A byte stream to the VNC server: straight TCP, or through a WebSocket relay.
enum Link {
    Tcp(TcpStream),
    Ws(Box<Ws>, Vec<u8>),
}

impl Link {
    async fn ws(url: &str) -> Link {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("websocket");
        Link::Ws(Box::new(ws), Vec::new())
    }

    async fn send(&mut self, data: &[u8]) {
        match self {
            Link::Tcp(s) => s.write_all(data).await.unwrap(),
            Link::Ws(ws, _) => ws.send(Message::Binary(data.to_vec().into())).await.unwrap(),
        }
    }

    async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        match self {
            Link::Tcp(s) => {
                let mut buf = vec![0; n];
                s.read_exact(&mut buf).await.unwrap();
                buf
            }
            Link::Ws(ws, pending) => {
                while pending.len() < n {
                    match ws.next().await {
                        Some(Ok(Message::Binary(b))) => pending.extend_from_slice(&b),
                        Some(Ok(_)) => {}
                        other => panic!("relay closed: {other:?}"),
                    }
                }
                pending.drain(..n).collect()
            }
        }
    }
}

/// RFB 3.8 handshake with no authentication; returns the framebuffer size and bytes per pixel.
async fn handshake(link: &mut Link) -> (u16, u16, usize) {
    let version = link.read_exact(12).await;
    assert!(version.starts_with(b"RFB 003."), "{version:?}");
    link.send(b"RFB 003.008\n").await;
    let n = link.read_exact(1).await[0] as usize;
    let types = link.read_exact(n).await;
    assert!(types.contains(&1), "the VNC server offers no 'None' security: {types:?}");
    link.send(&[1]).await;
    assert_eq!(link.read_exact(4).await, [0, 0, 0, 0], "security result");
    link.send(&[1]).await; // shared
    let init = link.read_exact(24).await;
    let (w, h) = (u16::from_be_bytes([init[0], init[1]]), u16::from_be_bytes([init[2], init[3]]));
    let bpp = init[4] as usize / 8;
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
    link.read_exact(name_len).await;
    // SetEncodings: raw only, so every update carries the whole pixel data.
    link.send(&[2, 0, 0, 1, 0, 0, 0, 0]).await;
    (w, h, bpp)
}

fn update_request(incremental: bool, x: u16, y: u16, w: u16, h: u16) -> Vec<u8> {
    let mut m = vec![3, incremental as u8];
    for v in [x, y, w, h] {
        m.extend_from_slice(&v.to_be_bytes());
    }
    m
}

/// Reads one FramebufferUpdate of raw rectangles; returns its size in bytes.
async fn read_update(link: &mut Link, bpp: usize) -> usize {
    loop {
        let head = link.read_exact(4).await;
        if head[0] != 0 {
            // Bell or cut text: skip what can be skipped and wait for the update.
            if head[0] == 3 {
                let len = link.read_exact(4).await;
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                link.read_exact(len).await;
            }
            continue;
        }
        let rects = u16::from_be_bytes([head[2], head[3]]) as usize;
        let mut total = 4;
        for _ in 0..rects {
            let r = link.read_exact(12).await;
            let (w, h) = (u16::from_be_bytes([r[4], r[5]]) as usize, u16::from_be_bytes([r[6], r[7]]) as usize);
            let enc = i32::from_be_bytes([r[8], r[9], r[10], r[11]]);
            let size = if enc == 0 { w * h * bpp } else { 0 };
            link.read_exact(size).await;
            total += 12 + size;
        }
        return total;
    }
}

/// MiB/s of full-screen updates for `secs` seconds.
async fn throughput(mut link: Link, secs: f64) -> f64 {
    let (w, h, bpp) = handshake(&mut link).await;
    let start = Instant::now();
    let mut bytes = 0usize;
    while start.elapsed().as_secs_f64() < secs {
        link.send(&update_request(false, 0, 0, w, h)).await;
        bytes += read_update(&mut link, bpp).await;
    }
    bytes as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

/// Round trips through the link to the VNC server, in microseconds: the time from sending the
/// client's protocol version to receiving the security types, which QEMU answers at once (its
/// framebuffer updates wait for a refresh timer, so they cannot time a relay).
async fn round_trip(mut link: Link) -> f64 {
    link.read_exact(12).await;
    let t = Instant::now();
    link.send(b"RFB 003.008\n").await;
    let n = link.read_exact(1).await[0] as usize;
    link.read_exact(n).await;
    t.elapsed().as_secs_f64() * 1e6
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn gateway_url(s: &VmServer, pc: &str) -> String {
    let (_, t) = s.call(reqwest::Method::POST, &format!("{VE}/cloudPCs/{pc}/getConsoleTicket"), None).await;
    format!("{}{}", s.url.replace("http://", "ws://"), t["url"].as_str().expect("ticket"))
}

async fn run() {
    let s = VmServer::start(&["--console-ticket-secs", "120"]).await;
    let sku = s.tiny_sku("BENCH", 1, 1, 1).await;
    let user = s.user("bench@contoso.com").await;
    let group = s.group("bench").await;
    s.add_member(&group, &user).await;
    let policy = s.tiny_policy("bench", json!({})).await;
    s.assign(&policy, &[&group]).await;
    s.license("bench@contoso.com", &sku, true).await;
    eprintln!("provisioning the Cloud PC to relay to");
    let pc: Value = s.wait_all(1, &["provisioned"], Duration::from_secs(300)).await.remove(0);
    let id = pc["id"].as_str().unwrap().to_string();
    let domain = format!("{}{}", s.prefix, pc["managedDeviceName"].as_str().unwrap().to_ascii_lowercase());
    let display = vm_support::virsh(&["vncdisplay", &domain]);
    let vnc_port = 5900 + display.trim().trim_start_matches("127.0.0.1:").parse::<u16>().expect("vnc display");
    let vnc = format!("127.0.0.1:{vnc_port}");
    // Let the guest reach its login prompt so the screen is stable.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // websockify from PyPI, in a venv under target/.
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-venv");
    if !venv.join("bin/websockify").exists() {
        let ok = std::process::Command::new("python3").args(["-m", "venv"]).arg(&venv).status().unwrap().success()
            && std::process::Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "websockify"])
                .status()
                .unwrap()
                .success();
        assert!(ok, "could not install websockify from PyPI");
    }
    let ws_port = 46000 + (std::process::id() % 1000) as u16;
    let mut websockify = std::process::Command::new(venv.join("bin/websockify"))
        .args([format!("127.0.0.1:{ws_port}"), vnc.clone()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let websockify_url = format!("ws://127.0.0.1:{ws_port}/");

    let secs = 5.0;
    eprintln!("measuring throughput against {vnc}");
    let direct_tp = throughput(Link::Tcp(TcpStream::connect(&vnc).await.unwrap()), secs).await;
    let gw_tp = throughput(Link::ws(&gateway_url(&s, &id).await).await, secs).await;
    let wsf_tp = throughput(Link::ws(&websockify_url).await, secs).await;
    eprintln!("measuring round trips");
    let (mut direct_rt, mut gw_rt, mut wsf_rt) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..300 {
        direct_rt.push(round_trip(Link::Tcp(TcpStream::connect(&vnc).await.unwrap())).await);
        gw_rt.push(round_trip(Link::ws(&gateway_url(&s, &id).await).await).await);
        wsf_rt.push(round_trip(Link::ws(&websockify_url).await).await);
    }
    for v in [&mut direct_rt, &mut gw_rt, &mut wsf_rt] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }

    println!("cloudpc gateway benchmark (one run; same QEMU VNC server; loopback; raw encoding; 300 round trips each)");
    println!("{:<34} {:>12} {:>12} {:>12}", "", "direct TCP", "gateway", "websockify");
    println!("{:<34} {:>12.1} {:>12.1} {:>12.1}", "throughput, MiB/s", direct_tp, gw_tp, wsf_tp);
    for (label, p) in [("round trip p50, µs", 0.5), ("round trip p99, µs", 0.99)] {
        println!("{:<34} {:>12.0} {:>12.0} {:>12.0}", label, pct(&direct_rt, p), pct(&gw_rt, p), pct(&wsf_rt, p));
    }
    println!("gateway / websockify throughput ratio: {:.2}", gw_tp / wsf_tp);
    println!(
        "added latency over direct, p99: gateway {:.0} µs, websockify {:.0} µs",
        pct(&gw_rt, 0.99) - pct(&direct_rt, 0.99),
        pct(&wsf_rt, 0.99) - pct(&direct_rt, 0.99)
    );
    let _ = websockify.kill();
    let _ = websockify.wait();

    // 1,000 idle sessions: connected through the gateway, nothing sent.
    let before = rss_kib(s.pid());
    let mut idle = Vec::new();
    let target = std::env::var("BENCH_SESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000usize);
    for _ in 0..target {
        match tokio::time::timeout(Duration::from_secs(10), async { Link::ws(&gateway_url(&s, &id).await).await }).await
        {
            Ok(link) => idle.push(link),
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(s.pid());
    println!(
        "idle sessions: {} open; gateway (whole cloudpc server) memory {:.1} MiB -> {:.1} MiB, {:.1} KiB per session",
        idle.len(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 / idle.len().max(1) as f64
    );
    drop(idle);
}

fn main() {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime").block_on(run());
}
