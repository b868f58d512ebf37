//! Custom images: real qcow2 files checked in the background; hostile files refused.

use std::io::Write;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn test_valid_qcow2_becomes_ready_with_its_size() {
    let s = Server::start().await;
    let file = qcow2(s.data_dir(), "base.qcow2", "3G");
    let img = s.image("Base", &file).await;
    assert_eq!(img["status"], "ready", "{img}");
    assert_eq!(img["sizeInGb"], 3.0);
    assert_eq!(img["errorCode"], serde_json::Value::Null);
    let (_, list) = s.get(&format!("{VE}/deviceImages")).await;
    assert_eq!(list["value"].as_array().unwrap().len(), 1);
    // cloudpc keeps its own standalone copy; the source may go away.
    let base = s.data_dir().join("images").join(format!("{}-1.0.0.qcow2", img["id"].as_str().unwrap()));
    let info = std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(&base).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 3u64 << 30);
    assert!(info.get("backing-filename").is_none(), "{info}");
    std::fs::remove_file(&file).unwrap();
    let policy = s.policy("After the source is gone", &img).await;
    s.delete(&format!("{VE}/provisioningPolicies/{}", policy["id"].as_str().unwrap())).await;
    let (status, _) = s.delete(&format!("{VE}/deviceImages/{}", img["id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!base.exists(), "deleting the image removes cloudpc's copy");
    let (status, gallery) = s.get(&format!("{VE}/galleryImages")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(gallery["value"].is_array());
}

async fn expect_failed(s: &Server, name: &str, file: &std::path::Path, code: &str, words: &str) {
    let img = s.image(name, file).await;
    assert_eq!(img["status"], "failed", "{name}: {img}");
    assert_eq!(img["errorCode"], code, "{name}: {img}");
    assert!(img["statusDetails"].as_str().unwrap().contains(words), "{name}: {img}");
}

#[tokio::test]
async fn test_hostile_and_broken_images_fail_with_error_codes() {
    let s = Server::start_with(&["--max-image-size-gb", "1"], Some(ADMIN_TOKEN)).await;
    let dir = s.data_dir().to_path_buf();

    let backing = dir.join("backing.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", backing.to_str().unwrap(), "64M"]);
    expect_failed(&s, "backing", &backing, "sourceImageInvalid", "backing file").await;

    let with_data = dir.join("datafile.qcow2");
    let data_file = dir.join("datafile.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", data_file.display()),
        with_data.to_str().unwrap(),
        "64M",
    ]);
    expect_failed(&s, "data file", &with_data, "sourceImageInvalid", "external data file").await;

    let random = dir.join("random.qcow2");
    std::fs::File::create(&random).unwrap().write_all(&[0x5a; 4096]).unwrap();
    expect_failed(&s, "random", &random, "sourceImageInvalid", "not a qcow2").await;

    let good = qcow2(&dir, "full.qcow2", "64M");
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.join("truncated.qcow2");
    std::fs::write(&truncated, &bytes[..100]).unwrap();
    expect_failed(&s, "truncated", &truncated, "sourceImageInvalid", "truncated").await;
    let cut = dir.join("cut.qcow2");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    expect_failed(&s, "cut in half", &cut, "sourceImageInvalid", "qemu-img check failed").await;

    let big = qcow2(&dir, "big.qcow2", "2G");
    expect_failed(&s, "oversized", &big, "sourceImageSizeExceedsLimitation", "limit is 1 GiB").await;

    expect_failed(&s, "missing", &dir.join("nope.qcow2"), "sourceImageNotFound", "no file").await;
    expect_failed(&s, "directory", &dir, "sourceImageInvalid", "not a regular file").await;
    let fifo = dir.join("fifo.qcow2");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    expect_failed(&s, "fifo", &fifo, "sourceImageInvalid", "not a regular file").await;
    let kept = files_under(&dir.join("images"));
    assert!(kept.is_empty(), "refused images leave nothing in cloudpc's image store: {kept:?}");
}

#[tokio::test]
async fn test_image_create_input_rules() {
    let s = Server::start().await;
    let before = s.snapshot().await;
    for (body, field) in [
        (json!({"displayName": "x", "version": "1.0", "sourceImageResourceId": "/tmp/x.qcow2"}), "version"),
        (
            json!({"displayName": "x", "version": "1.0.0", "sourceImageResourceId": "relative.qcow2"}),
            "sourceImageResourceId",
        ),
        (json!({"displayName": "", "version": "1.0.0", "sourceImageResourceId": "/tmp/x.qcow2"}), "displayName"),
        (json!({"displayName": "x", "version": "1.0.0"}), "sourceImageResourceId"),
    ] {
        let (status, v) = s.post(&format!("{VE}/deviceImages"), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message(&v).contains(field), "{field}: {v}");
    }
    assert_eq!(s.snapshot().await, before);
}

#[tokio::test]
async fn test_image_in_use_by_policy_cannot_be_deleted() {
    let s = Server::start().await;
    let img = s.ready_image("Base").await;
    let policy = s.policy("Finance", &img).await;
    let id = img["id"].as_str().unwrap();
    let (status, v) = s.delete(&format!("{VE}/deviceImages/{id}")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(message(&v).contains("Finance"), "{v}");
    let other = s.ready_image("Other").await;
    s.patch(&format!("{VE}/provisioningPolicies/{}", policy["id"].as_str().unwrap()), json!({"imageId": other["id"]}))
        .await;
    let (status, _) = s.delete(&format!("{VE}/deviceImages/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn test_upload_bad_requests_are_refused_and_store_nothing() {
    let s = Server::start().await;
    let reader = s.reader_token().await;
    let before = s.snapshot().await;
    let up = format!("{VE}/deviceImages/upload");
    let octets = Some("application/octet-stream");
    for (path, token, body, words) in [
        (format!("{up}?displayName=A&version=1.0"), ADMIN_TOKEN, "QFI", "Major.Minor.Patch"),
        (format!("{up}?version=1.0.0"), ADMIN_TOKEN, "QFI", "'displayName' is required"),
        (format!("{up}?displayName=A&version=1.0.0&path=/etc/passwd"), ADMIN_TOKEN, "QFI", "'path' is not known"),
        (format!("{up}?displayName=A&version=1.0.0"), ADMIN_TOKEN, "", "empty"),
        (format!("{up}?displayName=A&version=1.0.0"), reader.as_str(), "QFI", "Cloud PC Administrator"),
        (
            format!("{VE}/deviceImages/{}/versions/upload?version=1.0.0", uuid::Uuid::nil()),
            ADMIN_TOKEN,
            "QFI",
            "does not exist",
        ),
    ] {
        let (status, v) = s.raw(reqwest::Method::POST, &path, Some(token), Some(body), octets).await;
        assert!(status.is_client_error(), "{path}: {status} {v}");
        assert!(message(&v).contains(words), "{path}: {v}");
    }
    assert_eq!(s.snapshot().await, before, "nothing stored");
    // An announced size over the limit is refused before any byte of the body is read.
    let answer = announce_upload(&s, 1u64 << 42).await;
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("larger than"), "{answer}");
    let uploads = s.data_dir().join("images").join("uploads");
    let left: Vec<_> = std::fs::read_dir(&uploads).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "refused uploads leave no file: {left:?}");
}

#[tokio::test]
async fn test_host_paths_only_from_import_directories() {
    let s = Server::start().await;
    let before = s.snapshot().await;
    let inside = s.data_dir().to_str().unwrap().to_string();
    for path in ["/etc/passwd".to_string(), format!("{inside}/../escape.qcow2")] {
        let (status, v) = s
            .post(
                &format!("{VE}/deviceImages"),
                json!({"displayName": "x", "version": "1.0.0", "sourceImageResourceId": path}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert!(message(&v).contains("sourceImageResourceId") && message(&v).contains("import directory"), "{v}");
    }
    assert_eq!(s.snapshot().await, before, "nothing stored");
    // A symlink inside an import directory that leads out is refused when the file is checked.
    let outside = tempfile::tempdir().unwrap();
    let target = qcow2(outside.path(), "elsewhere.qcow2", "64M");
    let link = s.data_dir().join("link.qcow2");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    expect_failed(&s, "symlink", &link, "sourceImageInvalid", "outside the import directories").await;
}

#[tokio::test]
async fn test_images_stored_before_versions_are_migrated_at_start() {
    let s = Server::start().await;
    let img = s.ready_image("Old").await;
    let id = img["id"].as_str().unwrap().to_string();
    let database = s.database_url().map(str::to_string);
    let data = s.stop();
    // Make the record and its file look like session 1 wrote them: no versions, `<id>.qcow2`.
    let images = data.path().join("images");
    std::fs::rename(images.join(format!("{id}-1.0.0.qcow2")), images.join(format!("{id}.qcow2"))).unwrap();
    match database {
        Some(url) => {
            let sql = format!("UPDATE device_images SET body = (body::jsonb - 'versions')::text WHERE id = '{id}'");
            let out =
                std::process::Command::new("psql").args([url.as_str(), "-v", "ON_ERROR_STOP=1", "-qc", &sql]).output();
            let out = out.unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        None => {
            let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", data.path().join("cloudpc.db").display()))
                .await
                .unwrap();
            sqlx::query("UPDATE device_images SET body = json_remove(body, '$.versions') WHERE id = ?1")
                .bind(&id)
                .execute(&db)
                .await
                .unwrap();
            db.close().await;
        }
    }

    let s = Server::start_in(data, &[], Some(ADMIN_TOKEN)).await;
    let (_, img) = s.get(&format!("{VE}/deviceImages/{id}")).await;
    let versions = img["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{img}");
    assert_eq!((versions[0]["version"].as_str(), versions[0]["status"].as_str()), (Some("1.0.0"), Some("ready")));
    let images = s.data_dir().join("images");
    assert!(images.join(format!("{id}-1.0.0.qcow2")).exists(), "the base moved to its versioned name");
    assert!(!images.join(format!("{id}.qcow2")).exists());
    let policy = s.policy("Still usable", &img).await;
    assert_eq!(policy["imageId"], img["id"]);
}

/// Sends only the head of an upload that announces `length` bytes; returns the server's answer,
/// which must come without the body.
async fn announce_upload(s: &Server, length: u64) -> String {
    announce_upload_to(s, &format!("{VE}/deviceImages/upload?displayName=Huge&version=1.0.0"), length).await
}

async fn announce_upload_to(s: &Server, path: &str, length: u64) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut answer))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test]
async fn test_upload_that_would_fill_the_disk_is_refused() {
    let s = Server::start_with(&["--max-image-size-gb", "1000000"], Some(ADMIN_TOKEN)).await;
    let out = std::process::Command::new("df").args(["-B1", "--output=avail"]).arg(s.data_dir()).output().unwrap();
    let free: u64 = String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap();
    // Fits on the disk, but would leave less than the reserve cloudpc keeps for its Cloud PCs.
    let answer = announce_upload(&s, free.saturating_sub(1 << 30).max(1)).await;
    assert!(answer.starts_with("HTTP/1.1 507") && answer.contains("free space"), "{answer}");
    let (_, list) = s.get(&format!("{VE}/deviceImages")).await;
    assert_eq!(list["value"].as_array().unwrap().len(), 0);
}

/// A client that keeps sending after the server has refused its upload (as the CLI does while
/// streaming a file) still gets to read the refusal instead of a connection reset.
#[tokio::test]
async fn test_refused_upload_is_readable_while_the_client_is_still_sending() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start_with(&["--max-image-size-gb", "1"], Some(ADMIN_TOKEN)).await;
    let addr = s.url.trim_start_matches("http://").to_string();
    for token in [ADMIN_TOKEN, "wrong-token"] {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST {VE}/deviceImages/upload?displayName=Huge&version=1.0.0 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            2u64 << 30
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        // Far more than the socket buffers hold, so the server must read it for the writes to end.
        let chunk = vec![0u8; 1 << 20];
        for i in 0..64 {
            tokio::time::timeout(std::time::Duration::from_secs(20), conn.write_all(&chunk))
                .await
                .expect("the server keeps reading")
                .unwrap_or_else(|e| panic!("sending MiB {i} failed: {e}"));
        }
        let mut answer = vec![0u8; 4096];
        let n = conn.read(&mut answer).await.expect("the answer is readable");
        let answer = String::from_utf8_lossy(&answer[..n]).to_lowercase();
        let status = if token == ADMIN_TOKEN { "http/1.1 413" } else { "http/1.1 401" };
        assert!(answer.starts_with(status), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
    }
    // A client that asks leave to send (`Expect: 100-continue`) is refused without being asked
    // for the body.
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST {VE}/deviceImages/upload?displayName=Huge&version=1.0.0 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        2u64 << 30
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_lowercase();
    assert!(answer.starts_with("http/1.1 413"), "{answer}");
    let (_, list) = s.get(&format!("{VE}/deviceImages")).await;
    assert_eq!(list["value"].as_array().unwrap().len(), 0);
    assert!(files_under(&s.data_dir().join("images")).is_empty());
}

/// Starts an upload to `path` that announces 64 MiB, sends 1 MiB and then sends nothing more.
async fn stalled_upload(s: &Server, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        64u64 << 20
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&vec![0u8; 1 << 20]).await.unwrap();
    conn
}

/// Waits until an upload is being written to the upload area.
async fn wait_for_upload_file(s: &Server) {
    let uploads = s.data_dir().join("images").join("uploads");
    for _ in 0..200 {
        if !files_under(&uploads).is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no upload is being written");
}

/// Sends an upload of a few bytes to `path` until it is not refused with `busy`; returns the answer.
async fn upload_once_free(s: &Server, path: &str, busy: StatusCode) -> (StatusCode, serde_json::Value) {
    for _ in 0..200 {
        let answer =
            s.raw(reqwest::Method::POST, path, Some(ADMIN_TOKEN), Some("QFI"), Some("application/octet-stream")).await;
        if answer.0 != busy {
            return answer;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{path} stayed refused with {busy}");
}

/// Uploads beyond `--max-concurrent-uploads` are refused with 429 while the others stream, and a
/// client that breaks off frees its place and leaves no file.
#[tokio::test]
async fn test_uploads_beyond_the_concurrency_limit_get_429() {
    let s = Server::start_with(&["--max-concurrent-uploads", "1"], Some(ADMIN_TOKEN)).await;
    let up = format!("{VE}/deviceImages/upload?displayName=Second&version=1.0.0");
    // The first upload announces 64 MiB, sends 1 MiB and stalls.
    let first = stalled_upload(&s, &format!("{VE}/deviceImages/upload?displayName=First&version=1.0.0")).await;
    wait_for_upload_file(&s).await;

    let refused = reqwest::Client::new()
        .post(format!("{}{up}", s.url))
        .bearer_auth(ADMIN_TOKEN)
        .header("Content-Type", "application/octet-stream")
        .body("QFI")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()), Some("5".into()));
    let v: serde_json::Value = refused.json().await.unwrap();
    assert!(message(&v).contains("already receiving 1 image upload"), "{v}");

    // Breaking off the first upload frees its place and removes its partial file.
    drop(first);
    let (status, v) = upload_once_free(&s, &up, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (_, list) = s.get(&format!("{VE}/deviceImages")).await;
    let names: Vec<_> = list["value"].as_array().unwrap().iter().map(|i| i["displayName"].clone()).collect();
    assert_eq!(names, vec![json!("Second")], "the broken-off upload left no image");
    // The second upload is not a qcow2: once its check has refused it, nothing at all is left.
    let second = list["value"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(s.wait_image(&second).await["status"], "failed");
    assert_eq!(files_under(&s.data_dir().join("images")), Vec::<std::path::PathBuf>::new());
}

/// At most `--max-custom-images` images exist (Windows 365 keeps 20); failed ones count until
/// deleted, versions do not count, and an upload over the limit is refused before its body.
#[tokio::test]
async fn test_custom_image_count_is_limited() {
    let s = Server::start_with(&["--max-custom-images", "2"], Some(ADMIN_TOKEN)).await;
    let dir = s.data_dir().to_path_buf();
    let path = qcow2(&dir, "one.qcow2", "64M").to_str().unwrap().to_string();
    let body = |name: &str| json!({"displayName": name, "version": "1.0.0", "sourceImageResourceId": path});
    let (status, first) = s.post(&format!("{VE}/deviceImages"), body("One")).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let up = format!("{VE}/deviceImages/upload?displayName=Two&version=1.0.0");
    // A new image being uploaded holds the last place while it streams.
    let streaming = stalled_upload(&s, &format!("{VE}/deviceImages/upload?displayName=Streaming&version=1.0.0")).await;
    wait_for_upload_file(&s).await;
    let answer = announce_upload_to(&s, &up, 1 << 20).await;
    assert!(answer.starts_with("HTTP/1.1 409") && answer.contains("(and 1 being uploaded)"), "{answer}");
    drop(streaming);
    let (status, v) = upload_once_free(&s, &up, StatusCode::CONFLICT).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let before = s.snapshot().await;

    let (status, v) = s.post(&format!("{VE}/deviceImages"), body("Three")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("already 2 custom images"), "{v}");
    let up3 = format!("{VE}/deviceImages/upload?displayName=Three&version=1.0.0");
    let answer = announce_upload_to(&s, &up3, 64 << 20).await;
    assert!(answer.starts_with("HTTP/1.1 409") && answer.contains("already 2 custom images"), "{answer}");
    assert_eq!(s.snapshot().await, before, "nothing stored");

    // A new version of an existing image is not a new image.
    let id = first["id"].as_str().unwrap();
    let (status, v) = s
        .post(&format!("{VE}/deviceImages/{id}/versions"), json!({"version": "1.1.0", "sourceImageResourceId": path}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    // Deleting one makes room again.
    s.wait_image(id).await;
    let (status, _) = s.delete(&format!("{VE}/deviceImages/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = s.post(&format!("{VE}/deviceImages"), body("Three")).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
}

/// Writes a gallery build (manifest and blank disk) whose disk was written `age_secs` ago.
fn gallery_build(gallery: &std::path::Path, dir: &str, offer: &str, age_secs: u64) {
    let path = gallery.join(dir);
    std::fs::create_dir_all(&path).unwrap();
    qcow2(&path, "disk.qcow2", "1G");
    let manifest = json!({
        "id": format!("cloudpc_{dir}"), "displayName": format!("build {dir}"), "publisherName": "cloudpc",
        "offerName": offer, "skuName": dir, "disk": "disk.qcow2", "diskBytes": 1u64 << 30,
    });
    std::fs::write(path.join("manifest.json"), manifest.to_string()).unwrap();
    let when = std::time::SystemTime::now() - std::time::Duration::from_secs(age_secs);
    std::fs::File::options().write(true).open(path.join("disk.qcow2")).unwrap().set_modified(when).unwrap();
}

/// The newest build of each gallery offer is `supported`, older ones `supportedWithWarning`; a
/// build whose files are gone becomes `notSupported`: no new policy may use it, and a Cloud PC
/// of a policy that still names it fails with the reason.
#[tokio::test]
async fn test_gallery_builds_superseded_and_gone() {
    let data = tempfile::tempdir().unwrap();
    let gallery = data.path().join("gallery");
    gallery_build(&gallery, "x-old", "x", 3600);
    gallery_build(&gallery, "x-new", "x", 0);
    gallery_build(&gallery, "y-only", "y", 7200);
    let s = Server::start_in(data, &[], Some(ADMIN_TOKEN)).await;
    let status = |v: &serde_json::Value, id: &str| {
        v["value"].as_array().unwrap().iter().find(|i| i["id"] == id).map(|i| i["status"].clone())
    };
    let (_, v) = s.get(&format!("{VE}/galleryImages")).await;
    assert_eq!(status(&v, "cloudpc_x-new"), Some(json!("supported")), "{v}");
    assert_eq!(status(&v, "cloudpc_x-old"), Some(json!("supportedWithWarning")), "{v}");
    assert_eq!(status(&v, "cloudpc_y-only"), Some(json!("supported")), "{v}");
    let gallery_policy = |name: &str, id: &str| json!({"displayName": name, "imageId": id, "imageType": "gallery", "cloudPcNamingTemplate": "CPC-%RAND:5%"});
    let older = s.create(&format!("{VE}/provisioningPolicies"), gallery_policy("Older", "cloudpc_x-old")).await;
    assert_eq!(older["imageId"], "cloudpc_x-old", "an older build can still be picked");
    let doomed = s.create(&format!("{VE}/provisioningPolicies"), gallery_policy("Y", "cloudpc_y-only")).await;

    let data = s.stop();
    std::fs::remove_dir_all(data.path().join("gallery").join("y-only")).unwrap();
    let s = Server::start_in(data, &["--resync-secs", "1"], Some(ADMIN_TOKEN)).await;
    let (_, v) = s.get(&format!("{VE}/galleryImages")).await;
    assert_eq!(status(&v, "cloudpc_y-only"), Some(json!("notSupported")), "{v}");
    assert_eq!(status(&v, "cloudpc_x-new"), Some(json!("supported")), "{v}");
    let before = s.snapshot().await;
    let (code, v) = s.post(&format!("{VE}/provisioningPolicies"), gallery_policy("Y2", "cloudpc_y-only")).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    assert!(message(&v).contains("no longer supported"), "{v}");
    assert_eq!(s.snapshot().await, before);

    // The policy made before still names it: its Cloud PC fails at once, saying why.
    s.user_targeted_by(&doomed, "a@contoso.com").await;
    let sku = s.sku("ONE", 1).await;
    let (code, v) = s
        .post(
            "/v1.0/users/a@contoso.com/assignLicense",
            json!({"addLicenses": [{"skuId": sku["skuId"]}], "removeLicenses": []}),
        )
        .await;
    assert!(code.is_success(), "{v}");
    let pc = s.wait_first_cloud_pc("failed").await;
    assert_eq!(pc["status"], "failed", "{pc}");
    assert!(pc["statusDetail"].as_str().unwrap().contains("no longer supported"), "{pc}");
    assert_eq!(pc["provisioningPolicyId"], doomed["id"], "{pc}");
    assert_eq!(pc["provisioningPolicyName"], "Y", "{pc}");
    // It stays that one failed Cloud PC across resyncs (every second here; a Cloud PC without its
    // policy was deprovisioned at the first and made again at the next), and Retry tries again
    // and says the same.
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let (_, v) = s.get(&format!("{VE}/cloudPCs")).await;
    assert_eq!(v["value"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!((&v["value"][0]["id"], &v["value"][0]["status"]), (&pc["id"], &json!("failed")), "{v}");
    let made: Vec<_> = s.audit_activities().await.into_iter().filter(|a| a.contains("CloudPc")).collect();
    assert_eq!(made, vec!["Create CloudPc".to_string()], "made once, never deprovisioned");
    let (code, v) = s.post(&format!("{VE}/cloudPCs/{}/retry", pc["id"].as_str().unwrap()), json!({})).await;
    assert!(code.is_success(), "{v}");
    let mut again = serde_json::Value::Null;
    for _ in 0..100 {
        let (_, v) = s.get(&format!("{VE}/cloudPCs/{}", pc["id"].as_str().unwrap())).await;
        again = v;
        if again["status"] == "failed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(again["statusDetail"].as_str().unwrap().contains("no longer supported"), "{again}");
}

/// One version of an image can be deleted with its files, but not one a Cloud PC is built from,
/// not the only version, and not the last ready one of an image a policy uses.
#[tokio::test]
async fn test_image_version_delete_rules() {
    // A host too small for the license: the Cloud PC waits for capacity with its spec stored.
    let s = Server::start_on_small_host(&[]).await;
    let image = s.ready_image("Base").await;
    let id = image["id"].as_str().unwrap().to_string();
    let policy = s.policy("Uses Base", &image).await;
    let pc = s.waiting_cloud_pc(&policy).await;
    assert_eq!(pc["imageVersion"], "1.0.0", "{pc}");

    let dir = s.data_dir().to_path_buf();
    let add = |v: &str, file: &std::path::Path| json!({"version": v, "sourceImageResourceId": file.to_str().unwrap().to_string()});
    let versions = format!("{VE}/deviceImages/{id}/versions");
    s.create(&versions, add("1.1.0", &qcow2(&dir, "v11.qcow2", "64M"))).await;
    let junk = dir.join("junk.qcow2");
    std::fs::write(&junk, [0x5a; 4096]).unwrap();
    s.create(&versions, add("1.2.0", &junk)).await;
    let status_of = |img: &serde_json::Value, v: &str| {
        img["versions"].as_array().unwrap().iter().find(|e| e["version"] == v).map(|e| e["status"].clone())
    };
    let img = s.wait_checks(&id).await;
    assert_eq!(status_of(&img, "1.2.0"), Some(json!("failed")), "{img}");
    let base = |v: &str| s.data_dir().join("images").join(format!("{id}-{v}.qcow2"));
    assert!(base("1.0.0").exists() && base("1.1.0").exists());

    let before = s.snapshot().await;
    let (code, v) = s.delete(&format!("{versions}/1.0.0")).await;
    assert_eq!(code, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("used by Cloud PC"), "{v}");
    let (code, v) = s.delete(&format!("{versions}/9.9.9")).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(s.snapshot().await, before, "refusals change nothing");
    assert!(base("1.0.0").exists());

    // The failed version through the CLI, then the newest ready one: 1.0.0 is current again.
    let out = crate::cli::cli(&s, ADMIN_TOKEN, &["images", "delete-version", &id, "--version", "1.2.0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, v) = s.delete(&format!("{versions}/1.1.0")).await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{v}");
    assert!(!base("1.1.0").exists(), "its base file is removed");
    let (_, img) = s.get(&format!("{VE}/deviceImages/{id}")).await;
    let left: Vec<_> = img["versions"].as_array().unwrap().iter().map(|e| e["version"].clone()).collect();
    assert_eq!(left, vec![json!("1.0.0")], "{img}");
    assert_eq!((&img["version"], &img["status"]), (&json!("1.0.0"), &json!("ready")), "{img}");
    assert!(s.audit_activities().await.iter().any(|a| a == "Delete version of DeviceImage"));
    let (code, v) = s.delete(&format!("{versions}/1.0.0")).await;
    assert_eq!(code, StatusCode::CONFLICT, "{v}");

    // The last ready version of an image a policy uses (no Cloud PC on it).
    let other = s.ready_image("Other").await;
    let oid = other["id"].as_str().unwrap();
    s.policy("Uses Other", &other).await;
    s.create(&format!("{VE}/deviceImages/{oid}/versions"), add("2.0.0", &junk)).await;
    s.wait_checks(oid).await;
    let (code, v) = s.delete(&format!("{VE}/deviceImages/{oid}/versions/1.0.0")).await;
    assert_eq!(code, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("last ready version") && message(&v).contains("Uses Other"), "{v}");
}

/// A gallery build nothing uses can be deleted with its directory (and stays gone after a
/// restart); one that a policy or a Cloud PC uses cannot.
#[tokio::test]
async fn test_gallery_build_delete_rules() {
    let s = Server::start_on_small_host(&[]).await;
    let gallery = s.data_dir().join("gallery");
    let (code, v) = s.delete(&format!("{VE}/galleryImages/cloudpc_x-old")).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{v}");
    let data = s.stop();
    gallery_build(&gallery, "x-old", "x", 3600);
    gallery_build(&gallery, "x-new", "x", 0);
    gallery_build(&gallery, "y-only", "y", 0);
    gallery_build(&gallery, "z-old", "z", 3600);
    gallery_build(&gallery, "z-new", "z", 0);
    // A manifest that names a file outside its own directory is not registered.
    gallery_build(&gallery, "evil", "e", 0);
    let evil = json!({"id": "cloudpc_evil", "displayName": "evil", "publisherName": "p", "offerName": "e",
        "skuName": "e", "disk": "../x-new/disk.qcow2", "diskBytes": 1});
    std::fs::write(gallery.join("evil").join("manifest.json"), evil.to_string()).unwrap();
    // What a deletion interrupted by a crash leaves is swept at start.
    std::fs::create_dir_all(gallery.join("w-old.deleting")).unwrap();
    let config = gallery.parent().unwrap().join("cloudpc.toml");
    let s = Server::start_in(data, &["--config", config.to_str().unwrap()], Some(ADMIN_TOKEN)).await;
    assert!(!gallery.join("w-old.deleting").exists(), "an interrupted deletion is finished at start");
    let (code, _) = s.get(&format!("{VE}/galleryImages/cloudpc_evil")).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "a manifest naming files elsewhere is skipped");
    // Deleting the newest build of an offer makes the one before it current.
    let (code, v) = s.delete(&format!("{VE}/galleryImages/cloudpc_z-new")).await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{v}");
    let (_, z) = s.get(&format!("{VE}/galleryImages/cloudpc_z-old")).await;
    assert_eq!(z["status"], "supported", "{z}");
    assert!(!gallery.join("z-new").exists() && !gallery.join("z-new.deleting").exists());
    let gallery_policy = |name: &str, id: &str| json!({"displayName": name, "imageId": id, "imageType": "gallery", "cloudPcNamingTemplate": "CPC-%RAND:5%"});
    let old_policy = s.create(&format!("{VE}/provisioningPolicies"), gallery_policy("Old", "cloudpc_x-old")).await;
    let new_policy = s.create(&format!("{VE}/provisioningPolicies"), gallery_policy("New", "cloudpc_x-new")).await;
    // A Cloud PC waiting for capacity on the new build has its spec stored.
    s.waiting_cloud_pc(&new_policy).await;
    let (code, v) = s.delete(&format!("{VE}/provisioningPolicies/{}", new_policy["id"].as_str().unwrap())).await;
    assert!(code == StatusCode::CONFLICT, "the policy is assigned, so it stays: {v}");

    let before = s.snapshot().await;
    let (code, v) = s.delete(&format!("{VE}/galleryImages/cloudpc_x-old")).await;
    assert_eq!(code, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("provisioning policy 'Old'"), "{v}");
    let (code, v) = s.delete(&format!("{VE}/galleryImages/cloudpc_x-new")).await;
    assert_eq!(code, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("provisioning policy 'New'"), "{v}");
    assert_eq!(s.snapshot().await, before, "refusals change nothing");
    assert!(gallery.join("x-old").join("disk.qcow2").exists());

    // Once no policy names the old build, it goes, files and all (through the CLI).
    let (code, v) = s.delete(&format!("{VE}/provisioningPolicies/{}", old_policy["id"].as_str().unwrap())).await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{v}");
    let out = crate::cli::cli(&s, ADMIN_TOKEN, &["images", "gallery-delete", "cloudpc_x-old"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!gallery.join("x-old").exists(), "the build directory is removed");
    assert!(s.audit_activities().await.iter().any(|a| a == "Delete GalleryImage"));
    let (code, _) = s.get(&format!("{VE}/galleryImages/cloudpc_x-old")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    // A deleted build cannot be picked; repointing the policy leaves the Cloud PC on the new build.
    let policy_path = format!("{VE}/provisioningPolicies/{}", new_policy["id"].as_str().unwrap());
    let (code, v) = s.patch(&policy_path, json!({"imageId": "cloudpc_x-old", "imageType": "gallery"})).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    let (code, v) = s.patch(&policy_path, json!({"imageId": "cloudpc_y-only", "imageType": "gallery"})).await;
    assert!(code.is_success(), "{v}");
    let data = s.stop();
    let s = Server::start_in(data, &["--config", config.to_str().unwrap()], Some(ADMIN_TOKEN)).await;
    let (_, v) = s.get(&format!("{VE}/galleryImages")).await;
    let ids: Vec<_> = v["value"].as_array().unwrap().iter().map(|i| i["id"].clone()).collect();
    assert_eq!(
        ids,
        vec![json!("cloudpc_x-new"), json!("cloudpc_y-only"), json!("cloudpc_z-old")],
        "not registered again after a restart"
    );
    let (code, v) = s.delete(&format!("{VE}/galleryImages/cloudpc_x-new")).await;
    assert_eq!(code, StatusCode::CONFLICT, "{v}");
    assert!(message(&v).contains("used by Cloud PC"), "{v}");
    assert!(gallery.join("x-new").join("disk.qcow2").exists());
}

/// An upload that stops sending (its connection still open) is dropped after
/// `--upload-idle-timeout-secs`, frees its place and leaves no file.
#[tokio::test]
async fn test_stalled_upload_is_dropped_and_frees_its_place() {
    use tokio::io::AsyncReadExt;
    let s =
        Server::start_with(&["--max-concurrent-uploads", "1", "--upload-idle-timeout-secs", "1"], Some(ADMIN_TOKEN))
            .await;
    let mut stalled = stalled_upload(&s, &format!("{VE}/deviceImages/upload?displayName=Stalled&version=1.0.0")).await;
    // The server gives up on it and says why, on the connection that is still open.
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(30), stalled.read(&mut answer))
        .await
        .expect("the stalled upload is answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("nothing arrived for 1 s"), "{answer}");
    let up = format!("{VE}/deviceImages/upload?displayName=Next&version=1.0.0");
    let (status, v) =
        s.raw(reqwest::Method::POST, &up, Some(ADMIN_TOKEN), Some("QFI"), Some("application/octet-stream")).await;
    assert_eq!(status, StatusCode::CREATED, "the place is free again: {v}");
    let (_, list) = s.get(&format!("{VE}/deviceImages")).await;
    let names: Vec<_> = list["value"].as_array().unwrap().iter().map(|i| i["displayName"].clone()).collect();
    assert_eq!(names, vec![json!("Next")]);
    let partial: Vec<_> = files_under(&s.data_dir().join("images"))
        .into_iter()
        .filter(|f| f.metadata().map(|m| m.len() >= 1 << 20).unwrap_or(false))
        .collect();
    assert!(partial.is_empty(), "the stalled upload's bytes are gone: {partial:?}");
    drop(stalled);
}

/// Raw disk images (`format=raw`) are taken as they are and kept as qcow2; a qcow2 declared raw,
/// a size that is not whole sectors, and unknown formats are refused.
#[tokio::test]
async fn test_raw_disk_images() {
    let s = Server::start().await;
    let octets = Some("application/octet-stream");
    let up =
        |name: &str, format: &str| format!("{VE}/deviceImages/upload?displayName={name}&version=1.0.0&format={format}");
    let sectors = "\0".repeat(1 << 20);
    let (status, v) = s.raw(reqwest::Method::POST, &up("Raw", "raw"), Some(ADMIN_TOKEN), Some(&sectors), octets).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let raw = s.wait_image(v["id"].as_str().unwrap()).await;
    assert_eq!(raw["status"], "ready", "{raw}");
    assert_eq!(raw["versions"][0]["sourceImageFormat"], "raw", "{raw}");
    let base = s.data_dir().join("images").join(format!("{}-1.0.0.qcow2", raw["id"].as_str().unwrap()));
    let info = std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(&base).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!((info["format"].as_str(), info["virtual-size"].as_u64()), (Some("qcow2"), Some(1 << 20)), "{info}");

    let (status, v) =
        s.raw(reqwest::Method::POST, &up("Odd", "raw"), Some(ADMIN_TOKEN), Some("not whole sectors"), octets).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let odd = s.wait_image(v["id"].as_str().unwrap()).await;
    assert_eq!(odd["status"], "failed", "{odd}");
    assert!(odd["statusDetails"].as_str().unwrap().contains("512-byte sectors"), "{odd}");

    let qcow = qcow2(s.data_dir(), "really.qcow2", "64M");
    let (status, v) = s
        .post(
            &format!("{VE}/deviceImages"),
            json!({"displayName": "Disguised", "version": "1.0.0", "sourceImageResourceId": qcow, "sourceImageFormat": "raw"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let disguised = s.wait_image(v["id"].as_str().unwrap()).await;
    assert_eq!(disguised["status"], "failed", "{disguised}");
    assert!(disguised["statusDetails"].as_str().unwrap().contains("is a qcow2 image"), "{disguised}");

    // A VMDK descriptor declared raw could name any host file as its data: refused as a VMDK.
    let mut descriptor =
        "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/shadow\" 0\n".to_string();
    descriptor.push_str(&"\n".repeat(512 - descriptor.len()));
    let (status, v) =
        s.raw(reqwest::Method::POST, &up("Vmdk", "raw"), Some(ADMIN_TOKEN), Some(&descriptor), octets).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let vmdk = s.wait_image(v["id"].as_str().unwrap()).await;
    assert_eq!(vmdk["status"], "failed", "{vmdk}");
    assert!(vmdk["statusDetails"].as_str().unwrap().contains("is a VMDK image"), "{vmdk}");

    // Versions take the format too: uploaded, and from a host file.
    let raw_id = raw["id"].as_str().unwrap();
    let versions = format!("{VE}/deviceImages/{raw_id}/versions");
    let upload_version = format!("{versions}/upload?version=1.1.0&format=raw");
    let (status, v) = s.raw(reqwest::Method::POST, &upload_version, Some(ADMIN_TOKEN), Some(&sectors), octets).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let host_raw = s.data_dir().join("disk.img");
    std::fs::File::create(&host_raw).unwrap().set_len(2 << 20).unwrap();
    let body = json!({"version": "1.2.0", "sourceImageResourceId": host_raw, "sourceImageFormat": "raw"});
    let (status, v) = s.post(&versions, body).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let img = s.wait_checks(raw_id).await;
    let formats: Vec<_> = img["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].clone(), v["status"].clone(), v["sourceImageFormat"].clone()))
        .collect();
    let raw_ready = |v: &str| (json!(v), json!("ready"), json!("raw"));
    assert_eq!(formats, vec![raw_ready("1.0.0"), raw_ready("1.1.0"), raw_ready("1.2.0")], "{img}");

    let before = s.snapshot().await;
    let (status, v) =
        s.raw(reqwest::Method::POST, &up("Vmdk", "vmdk"), Some(ADMIN_TOKEN), Some(&sectors), octets).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(message(&v).contains("must be qcow2 or raw"), "{v}");
    let (status, v) = s
        .post(
            &format!("{VE}/deviceImages"),
            json!({"displayName": "Vhd", "version": "1.0.0", "sourceImageResourceId": qcow, "sourceImageFormat": "vhd"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(message(&v).contains("sourceImageFormat"), "{v}");
    assert_eq!(s.snapshot().await, before, "refusals store nothing");
    // Only the ready versions' bases are kept.
    let mut kept = files_under(&s.data_dir().join("images"));
    kept.sort();
    let want: Vec<_> = ["1.0.0", "1.1.0", "1.2.0"]
        .iter()
        .map(|v| s.data_dir().join("images").join(format!("{raw_id}-{v}.qcow2")))
        .collect();
    assert_eq!(kept, want);
    assert_eq!(want[0], base);
}

/// An image cannot be deleted between a new Cloud PC reading it from its policy and storing the
/// spec that names it, even if the policy is repointed in between (the window is widened here
/// with a testing delay inside `start_generation`).
#[tokio::test]
async fn test_image_not_deleted_while_a_cloud_pc_starts_on_it() {
    let s = Server::start_on_small_host(&["--inject-delay", "startGeneration:3000"]).await;
    let first = s.ready_image("First").await;
    let second = s.ready_image("Second").await;
    let policy = s.policy("Repointed", &first).await;
    s.user_targeted_by(&policy, "racer@contoso.com").await;
    let sku = s.sku("RACE", 1).await;
    let body = json!({"addLicenses": [{"skuId": sku["skuId"]}], "removeLicenses": []});
    let (status, v) = s.post("/v1.0/users/racer@contoso.com/assignLicense", body).await;
    assert!(status.is_success(), "{v}");
    // The Cloud PC exists as soon as its generation starts; the spec follows 3 s later.
    let mut seen = false;
    for _ in 0..100 {
        let (_, v) = s.get(&format!("{VE}/cloudPCs")).await;
        if !v["value"].as_array().unwrap().is_empty() {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(seen, "no Cloud PC was made");
    let policy_path = format!("{VE}/provisioningPolicies/{}", policy["id"].as_str().unwrap());
    let (status, v) = s.patch(&policy_path, json!({"imageId": second["id"], "imageType": "custom"})).await;
    assert!(status.is_success(), "{v}");
    let (status, v) = s.delete(&format!("{VE}/deviceImages/{}", first["id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::CONFLICT, "the image the new Cloud PC is built from stays: {v}");
    assert!(message(&v).contains("used by Cloud PC"), "{v}");
    let pc = s.wait_first_cloud_pc("pendingProvision").await;
    assert_eq!(pc["imageDisplayName"], "First", "{pc}");
}
