//! Commands for the people at the keyboard: `list`, `open`, `notify`. They
//! run as the calling user; the daemon answers for that uid only.

use std::{
    collections::HashMap,
    os::unix::process::CommandExt as _,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;

use super::client::call;
use crate::control::{self, Request};

/// Arguments of `spicegate list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn list(socket: &Path, args: &ListArgs) -> anyhow::Result<ExitCode> {
    let v = call(socket, &Request::List {})?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let vms = v["vms"].as_array().cloned().unwrap_or_default();
    if vms.is_empty() {
        println!(
            "{}: no VMs, now or later",
            v["user"].as_str().unwrap_or("you")
        );
    }
    for vm in vms {
        println!("{}", describe(&vm));
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per VM: name, state, how it is reached.
fn describe(vm: &Value) -> String {
    let name = vm["name"].as_str().unwrap_or("?");
    let state = if vm["allowed_now"].as_bool() == Some(true) {
        match vm["next_change"].as_str() {
            Some(t) => format!("open now (until {t})"),
            None => "open now".to_owned(),
        }
    } else if vm["console_only"].as_bool() == Some(true) {
        "only while you hold this machine's console".to_owned()
    } else {
        match vm["next_change"].as_str() {
            Some(t) => format!("later (from {t})"),
            None => "not now".to_owned(),
        }
    };
    let mut how = format!(
        "{} (server {})",
        vm["host"].as_str().unwrap_or("?"),
        vm["server"].as_str().unwrap_or("?")
    );
    if let Some(p) = vm["port"].as_u64() {
        how.push_str(&format!(" port {p}"));
    }
    if let Some(p) = vm["tls_port"].as_u64() {
        how.push_str(&format!(" tls-port {p}"));
    }
    format!("{name}: {state}; {how}")
}

/// The `spice://` URI of a VM entry of `list`.
pub fn spice_uri(vm: &Value) -> anyhow::Result<String> {
    let host = vm["host"].as_str().unwrap_or("localhost");
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let mut query = Vec::new();
    if let Some(p) = vm["port"].as_u64() {
        query.push(format!("port={p}"));
    }
    if let Some(p) = vm["tls_port"].as_u64() {
        query.push(format!("tls-port={p}"));
    }
    if query.is_empty() {
        bail!("vm {} has no ports", vm["name"].as_str().unwrap_or("?"));
    }
    Ok(format!("spice://{host}?{}", query.join("&")))
}

/// Arguments of `spicegate open`.
#[derive(Debug, clap::Args)]
pub struct OpenArgs {
    /// VM name.
    vm: String,
    /// Print the client command instead of starting it.
    #[arg(long)]
    dry_run: bool,
}

pub fn open(socket: &Path, args: &OpenArgs) -> anyhow::Result<ExitCode> {
    let v = call(socket, &Request::List {})?;
    let vms = v["vms"].as_array().cloned().unwrap_or_default();
    let Some(vm) = vms.iter().find(|x| x["name"].as_str() == Some(&args.vm)) else {
        bail!(
            "you have no access to VM `{}`: ask your administrator (see `spicegate list`)",
            args.vm
        );
    };
    if vm["allowed_now"].as_bool() != Some(true) {
        let when = if vm["console_only"].as_bool() == Some(true) {
            "it opens only for whoever is logged in at this machine's screen".to_owned()
        } else if let Some(t) = vm["next_change"].as_str() {
            format!("your access begins {t}")
        } else {
            "no access window is coming up".to_owned()
        };
        eprintln!("spicegate: you may not open VM `{}` now: {when}", args.vm);
        return Ok(ExitCode::from(1));
    }
    let client: Vec<String> = v["client"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .filter(|c: &Vec<String>| !c.is_empty())
        .unwrap_or_else(|| vec!["remote-viewer".to_owned()]);
    let mut argv = client.clone();
    if let (Some(ca), true) = (vm["ca_file"].as_str(), client[0].ends_with("remote-viewer")) {
        argv.push(format!("--spice-ca-file={ca}"));
    }
    argv.push(spice_uri(vm)?);
    if args.dry_run {
        println!("{}", argv.join(" "));
        return Ok(ExitCode::SUCCESS);
    }
    let err = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
    bail!(
        "starting {}: {err} (set `[settings] client` in the policy to another Spice client)",
        argv[0]
    )
}

/// Arguments of `spicegate notify`.
#[derive(Debug, clap::Args)]
pub struct NotifyArgs {
    /// Seconds between two notices about the same VM.
    #[arg(long, default_value_t = 30)]
    every: u64,
}

/// The per-user notice agent: follows the caller's own denials over the
/// control socket and shows each as a desktop notification on the caller's
/// session bus. The root daemon never talks into a user's session.
pub fn notify(socket: &Path, args: &NotifyArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("async runtime")?;
    rt.block_on(async {
        let bus = zbus::Connection::session()
            .await
            .context("connecting to the session bus (is this a desktop session?)")?;
        let mut last: HashMap<String, Instant> = HashMap::new();
        loop {
            if let Err(e) = follow(socket, &bus, &mut last, Duration::from_secs(args.every)).await {
                log::debug!("notify: {e:#}; retrying");
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
}

async fn follow(
    socket: &Path,
    bus: &zbus::Connection,
    last: &mut HashMap<String, Instant>,
    every: Duration,
) -> anyhow::Result<()> {
    let mut stream = control::connect(socket).await?;
    let mut line = serde_json::to_vec(&Request::Events {})?;
    line.push(b'\n');
    tokio::io::AsyncWriteExt::write_all(&mut stream, &line).await?;
    let mut lines = tokio::io::BufReader::new(stream).lines();
    let first = lines
        .next_line()
        .await?
        .context("the daemon closed the connection")?;
    let resp: control::Response = serde_json::from_str(&first)?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_default());
    }
    while let Some(l) = lines.next_line().await? {
        let Ok(rec) = serde_json::from_str::<crate::events::DenyRecord>(&l) else {
            continue;
        };
        if rec.audit {
            continue;
        }
        let key = rec.vm.clone().unwrap_or_else(|| rec.dst.clone());
        if last.get(&key).is_some_and(|t| t.elapsed() < every) {
            continue;
        }
        last.insert(key, Instant::now());
        let why = control::call(
            socket,
            &Request::Why {
                user: format!("#{}", rec.uid),
                addr: rec
                    .addr
                    .parse()
                    .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])),
                port: rec.port,
            },
        )
        .await
        .ok();
        let short = why
            .as_ref()
            .and_then(|w| w["short"].as_str())
            .unwrap_or("not granted")
            .to_owned();
        let summary = match &rec.vm {
            Some(vm) => format!("Access to VM {vm} refused"),
            None => format!("Connection to {} refused", rec.dst),
        };
        let body = format!("{} ({}, {}): {short}", rec.dst, rec.comm, rec.time);
        show(bus, &summary, &body).await?;
    }
    Ok(())
}

/// org.freedesktop.Notifications.Notify on the session bus.
async fn show(bus: &zbus::Connection, summary: &str, body: &str) -> anyhow::Result<()> {
    let hints: HashMap<&str, zbus::Variant<'_>> = HashMap::new();
    let actions: Vec<&str> = Vec::new();
    bus.call_method(
        Some("org.freedesktop.Notifications"),
        "/org/freedesktop/Notifications",
        Some("org.freedesktop.Notifications"),
        "Notify",
        &(
            "spicegate",
            0u32,
            "dialog-warning",
            summary,
            body,
            actions,
            hints,
            -1i32,
        ),
    )
    .await
    .context("showing a notification")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn uris() {
        let vm = json!({"name": "v", "host": "kvm.example.lan", "port": 5900, "tls_port": 5901});
        assert_eq!(
            spice_uri(&vm).expect("uri"),
            "spice://kvm.example.lan?port=5900&tls-port=5901"
        );
        let vm = json!({"name": "v", "host": "fd00::2", "port": null, "tls_port": 20002});
        assert_eq!(
            spice_uri(&vm).expect("uri"),
            "spice://[fd00::2]?tls-port=20002"
        );
        assert!(spice_uri(&json!({"name": "v", "host": "h"})).is_err());
    }

    #[test]
    fn list_lines() {
        let vm = json!({"name": "leaptest", "host": "192.0.2.7", "server": "mysrv", "port": null, "tls_port": 20004,
                        "allowed_now": false, "next_change": "2026-11-25T07:00:00Z", "console_only": false});
        assert_eq!(
            describe(&vm),
            "leaptest: later (from 2026-11-25T07:00:00Z); 192.0.2.7 (server mysrv) tls-port 20004"
        );
    }
}
