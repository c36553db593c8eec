//! Commands that talk to the running daemon: reload, status, why, grant,
//! revoke, events.

use std::{net::IpAddr, path::Path, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use serde::de::DeserializeOwned;

use crate::control::{
    self, GrantAnswer, NotRunningStatus, ReloadAnswer, Request, RevokeAnswer, Status, UsersPage,
    WhyAnswer,
};

fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("async runtime")?
        .block_on(f))
}

/// One request and its answer, read as `T` (see [`control::call`]).
pub fn call<T: DeserializeOwned>(socket: &Path, req: &Request) -> anyhow::Result<T> {
    block_on(control::call(socket, req))?
}

/// Arguments of `spicegate reload`.
#[derive(Debug, clap::Args)]
pub struct ReloadArgs {}

pub fn reload(socket: &Path) -> anyhow::Result<ExitCode> {
    let v: ReloadAnswer = call(socket, &Request::Reload {})?;
    println!("policy reloaded: {}", v.summary);
    if v.changes.is_empty() {
        println!("no change in who may open what");
    }
    for c in v.changes {
        println!("{c}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `spicegate status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print the status document as JSON (field names are stable).
    #[arg(long)]
    json: bool,
    /// With --users: the VM whose users to list.
    #[arg(long, value_name = "NAME", requires = "users")]
    vm: Option<String>,
    /// Every user who may open --vm now, one per line (`status` itself
    /// lists at most 100 per VM), fetched in pages of 1,000.
    #[arg(long, requires = "vm")]
    users: bool,
    #[command(flatten)]
    pin: super::PinDirArg,
}

/// `status --vm NAME --users`: every page, printed as it arrives.
fn status_users(socket: &Path, vm: &str, json: bool) -> anyhow::Result<ExitCode> {
    vm_users(socket, vm, |u| {
        if json {
            println!("{}", serde_json::to_string(&u)?);
        } else {
            println!(
                "{} {} {}",
                u.uid,
                u.user.as_deref().unwrap_or("?"),
                u.via.as_str()
            );
        }
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Hands `each` every user who may open `vm` now, fetched page by page.
pub fn vm_users(
    socket: &Path,
    vm: &str,
    mut each: impl FnMut(crate::control::VmUser) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut after = None;
    loop {
        let page: UsersPage = call(
            socket,
            &Request::Users {
                vm: vm.to_owned(),
                after,
            },
        )?;
        for u in page.users {
            each(u)?;
        }
        match page.next_after {
            Some(a) => after = Some(a),
            None => return Ok(()),
        }
    }
}

pub fn status(socket: &Path, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    if let (Some(vm), true) = (&args.vm, args.users) {
        return status_users(socket, vm, args.json);
    }
    let v: Status = match call(socket, &Request::Status {}) {
        Ok(v) => v,
        Err(e) if e.downcast_ref::<crate::control::NotRunning>().is_none() => return Err(e),
        Err(e) => {
            // Not running: still say whether enforcement is pinned.
            let paths = crate::kernel::PinPaths::new(&args.pin.pin_dir);
            let pinned = paths.has_links();
            if args.json {
                let down = NotRunningStatus {
                    attached: pinned,
                    error: format!("{e:#}"),
                    running: false,
                };
                println!("{}", serde_json::to_string(&down)?);
            } else {
                eprintln!("{e:#}");
                println!(
                    "daemon: not running; enforcement: {}",
                    if pinned {
                        "still pinned (decisions as last applied)"
                    } else {
                        "none"
                    }
                );
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_status(&v);
    Ok(ExitCode::SUCCESS)
}

/// `status` for people.
fn print_status(v: &Status) {
    println!("daemon: running (since {})", v.started_at);
    println!("attached: {} (cgroup {})", v.attached, v.cgroup.display());
    println!("rule table in force: {}", v.table_in_force);
    println!("mode: {}", v.mode);
    let p = &v.policy;
    println!(
        "policy: {} [{}] sha256 {} loaded {}",
        p.path.display(),
        p.source,
        p.sha256,
        p.loaded_at
    );
    let r = &v.last_reload;
    println!("last reload: {} ok={} {}", r.at, r.ok, r.message);
    let c = &v.counts;
    println!(
        "counts: {} vm(s), {} guarded endpoint(s), {} port(s) guarded everywhere, {} grant(s)",
        c.vms, c.guarded_endpoints, c.ports_guarded_everywhere, c.grants
    );
    if v.degraded {
        println!(
            "DEGRADED: names of the policy that do not resolve are granted nothing until they do:"
        );
        for u in &v.unresolved {
            println!("  {} ({}): {}", u.name, u.at, u.why);
        }
    }
    if !v.listeners.ports.is_empty() {
        let users: Vec<&str> = v
            .listeners
            .users
            .iter()
            .map(|u| u.user.as_deref().unwrap_or("?"))
            .collect();
        println!(
            "listeners: root{}{} may bind the guarded local ports ({} port(s))",
            if users.is_empty() { "" } else { ", " },
            users.join(", "),
            v.listeners.ports.len()
        );
    }
    let d = &v.drops;
    println!(
        "denial log: {} DENY line(s), {} SUPPRESSED summary line(s); not logged one by one: {} rate-limited, {} over the line budget, {} lost (kernel ring full), {} lost (daemon queue full); {} summary record(s) lost (flood ring full)",
        d.logged,
        d.summaries,
        d.rate_limited,
        d.over_budget,
        d.log_ring_full,
        d.queue_full,
        d.flood_ring_full
    );
    for vm in &v.vms {
        let users: Vec<String> = vm
            .users
            .iter()
            .map(|u| {
                let t = if u.temporary { "*" } else { "" };
                format!("{}{t}", u.user.as_deref().unwrap_or("?"))
            })
            .collect();
        let more = vm.users_total.saturating_sub(users.len());
        println!(
            "vm {} [{}]: allowed now: {}{}; connects allowed {} denied {}",
            vm.name,
            vm.endpoints.join(", "),
            if users.is_empty() {
                "(no one)".into()
            } else {
                users.join(", ")
            },
            if more > 0 {
                format!(
                    " and {more} more (`spicegate status --vm {} --users`)",
                    vm.name
                )
            } else {
                String::new()
            },
            vm.allowed,
            vm.denied
        );
    }
    for g in &v.temporary_grants {
        println!(
            "temporary grant: {} on {} until {}",
            g.user,
            g.vm,
            g.expires.as_deref().unwrap_or("revoked")
        );
    }
}

/// Arguments of `spicegate why`.
#[derive(Debug, clap::Args)]
pub struct WhyArgs {
    /// User name or #UID.
    user: String,
    /// Destination as ADDRESS:PORT (`[v6]:port` for IPv6).
    endpoint: String,
}

/// Parses `1.2.3.4:5930`, `[::1]:5930`.
pub fn parse_endpoint(s: &str) -> anyhow::Result<(IpAddr, u16)> {
    let sa: std::net::SocketAddr = s
        .parse()
        .with_context(|| format!("`{s}` is not ADDRESS:PORT (write IPv6 as [addr]:port)"))?;
    Ok((sa.ip(), sa.port()))
}

pub fn why(socket: &Path, args: &WhyArgs) -> anyhow::Result<ExitCode> {
    let (addr, port) = parse_endpoint(&args.endpoint)?;
    let v: WhyAnswer = call(
        socket,
        &Request::Why {
            user: args.user.clone(),
            addr,
            port,
        },
    )?;
    println!("{}: {}", if v.allow { "allow" } else { "deny" }, v.reason);
    if let Some(bind) = &v.bind {
        println!("bind: {bind}");
    }
    Ok(if v.allow {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Arguments of `spicegate grant`.
#[derive(Debug, clap::Args)]
pub struct GrantArgs {
    /// User name or #UID.
    user: String,
    /// VM name from the policy.
    vm: String,
    /// How long: 90s, 30m, 2h, 1d [default: until revoked].
    #[arg(long = "for", value_name = "DURATION")]
    duration: Option<String>,
}

pub fn grant(socket: &Path, args: &GrantArgs) -> anyhow::Result<ExitCode> {
    let for_secs = match &args.duration {
        None => None,
        Some(d) => {
            let dur: Duration = humantime::parse_duration(d)
                .with_context(|| format!("`{d}` is not a duration (try 90s, 30m, 2h, 1d)"))?;
            if dur.is_zero() {
                bail!("--for must be longer than zero");
            }
            if dur.as_secs() > crate::grants::MAX_GRANT_SECS {
                bail!(
                    "--for {d} is longer than 10 years: a temporary grant lasts at most 10y; for longer, put the user in the policy"
                );
            }
            Some(dur.as_secs().max(1))
        }
    };
    let v: GrantAnswer = call(
        socket,
        &Request::Grant {
            user: args.user.clone(),
            vm: args.vm.clone(),
            for_secs,
        },
    )?;
    println!(
        "granted: {} may open {} {}",
        v.user,
        v.vm,
        v.expires
            .map_or_else(|| "until revoked".to_owned(), |e| format!("until {e}"))
    );
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `spicegate revoke`.
#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// User name or #UID.
    user: String,
    /// VM name.
    vm: String,
}

pub fn revoke(socket: &Path, args: &RevokeArgs) -> anyhow::Result<ExitCode> {
    let v: RevokeAnswer = call(
        socket,
        &Request::Revoke {
            user: args.user.clone(),
            vm: args.vm.clone(),
        },
    )?;
    println!(
        "revoked: {} may no longer open {} (by temporary grant)",
        v.user, v.vm
    );
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `spicegate events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// One JSON object per line instead of DENY lines.
    #[arg(long)]
    json: bool,
}

pub fn events(socket: &Path, args: &EventsArgs) -> anyhow::Result<ExitCode> {
    block_on(async {
        let mut lines = control::subscribe(socket).await?;
        while let Some(l) = lines.next_line().await? {
            if args.json {
                println!("{l}");
            } else if let Ok(item) = serde_json::from_str::<crate::denials::StreamItem>(&l) {
                match item {
                    crate::denials::StreamItem::Deny(rec) => {
                        println!("{} {}", rec.time, rec.line())
                    }
                    crate::denials::StreamItem::Skipped { skipped } => println!(
                        "SKIPPED {skipped} denial(s) not shown (rate limit, full buffers or a slow reader; see `spicegate status`)"
                    ),
                }
            } else {
                println!("{l}");
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}
