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

use super::client::call;
use crate::control::{self, ListAnswer, ListVm, Request, WhyAnswer};

/// Arguments of `spicegate list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn list(socket: &Path, args: &ListArgs) -> anyhow::Result<ExitCode> {
    let v: ListAnswer = call(socket, &Request::List {})?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if v.vms.is_empty() {
        println!(
            "{}: no VMs, now or later",
            v.user.as_deref().unwrap_or("you")
        );
    }
    for vm in &v.vms {
        println!("{}", describe(vm));
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per VM: name, state, how it is reached.
fn describe(vm: &ListVm) -> String {
    let state = if vm.allowed_now {
        match &vm.next_change {
            Some(t) => format!("open now (until {t})"),
            None => "open now".to_owned(),
        }
    } else if vm.console_only {
        "only while you hold this machine's console".to_owned()
    } else {
        match &vm.next_change {
            Some(t) => format!("later (from {t})"),
            None => "not now".to_owned(),
        }
    };
    let mut how = format!("{} (server {})", vm.host, vm.server);
    if let Some(p) = vm.port {
        how.push_str(&format!(" port {p}"));
    }
    if let Some(p) = vm.tls_port {
        how.push_str(&format!(" tls-port {p}"));
    }
    format!("{}: {state}; {how}", vm.name)
}

/// The `spice://` URI of a VM entry of `list`.
pub fn spice_uri(vm: &ListVm) -> anyhow::Result<String> {
    let host = if vm.host.contains(':') {
        format!("[{}]", vm.host)
    } else {
        vm.host.clone()
    };
    let mut query = Vec::new();
    if let Some(p) = vm.port {
        query.push(format!("port={p}"));
    }
    if let Some(p) = vm.tls_port {
        query.push(format!("tls-port={p}"));
    }
    if query.is_empty() {
        bail!("vm {} has no ports", vm.name);
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
    let v: ListAnswer = call(socket, &Request::List {})?;
    let Some(vm) = v.vms.iter().find(|x| x.name == args.vm) else {
        bail!(
            "you have no access to VM `{}`: ask your administrator (see `spicegate list`)",
            args.vm
        );
    };
    if !vm.allowed_now {
        let when = if vm.console_only {
            "it opens only for whoever is logged in at this machine's screen".to_owned()
        } else if let Some(t) = &vm.next_change {
            format!("your access begins {t}")
        } else {
            "no access window is coming up".to_owned()
        };
        eprintln!("spicegate: you may not open VM `{}` now: {when}", args.vm);
        return Ok(ExitCode::from(1));
    }
    let client = if v.client.is_empty() {
        vec!["remote-viewer".to_owned()]
    } else {
        v.client.clone()
    };
    let mut argv = client.clone();
    if let (Some(ca), true) = (&vm.ca_file, client[0].ends_with("remote-viewer")) {
        argv.push(format!("--spice-ca-file={}", ca.display()));
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
    let mut lines = control::subscribe(socket).await?;
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
        let why = control::call::<WhyAnswer>(
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
        let short = why.map_or_else(|| "not granted".to_owned(), |w| w.short);
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
    use super::*;

    fn vm(host: &str, port: Option<u16>, tls_port: Option<u16>) -> ListVm {
        ListVm {
            name: "v".into(),
            host: host.into(),
            port,
            tls_port,
            ..ListVm::default()
        }
    }

    #[test]
    fn uris() {
        assert_eq!(
            spice_uri(&vm("kvm.example.lan", Some(5900), Some(5901))).expect("uri"),
            "spice://kvm.example.lan?port=5900&tls-port=5901"
        );
        assert_eq!(
            spice_uri(&vm("fd00::2", None, Some(20002))).expect("uri"),
            "spice://[fd00::2]?tls-port=20002"
        );
        assert!(spice_uri(&vm("h", None, None)).is_err());
    }

    #[test]
    fn list_lines() {
        let vm = ListVm {
            name: "leaptest".into(),
            server: "mysrv".into(),
            next_change: Some("2026-11-25T07:00:00Z".into()),
            ..vm("192.0.2.7", None, Some(20004))
        };
        assert_eq!(
            describe(&vm),
            "leaptest: later (from 2026-11-25T07:00:00Z); 192.0.2.7 (server mysrv) tls-port 20004"
        );
    }
}
