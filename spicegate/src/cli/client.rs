//! Commands that talk to the running daemon: reload, status, why, grant,
//! revoke, events.

use std::{net::IpAddr, path::Path, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;

use crate::control::{self, Request};

fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("async runtime")?
        .block_on(f))
}

pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Value> {
    block_on(control::call(socket, req))?
}

/// Arguments of `spicegate reload`.
#[derive(Debug, clap::Args)]
pub struct ReloadArgs {}

pub fn reload(socket: &Path) -> anyhow::Result<ExitCode> {
    let v = call(socket, &Request::Reload {})?;
    println!(
        "policy reloaded: {}",
        v["summary"].as_str().unwrap_or_default()
    );
    let changes = v["changes"].as_array().cloned().unwrap_or_default();
    if changes.is_empty() {
        println!("no change in who may open what");
    }
    for c in changes {
        println!("{}", c.as_str().unwrap_or_default());
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
    let mut after = None;
    loop {
        let page = call(
            socket,
            &Request::Users {
                vm: vm.to_owned(),
                after,
            },
        )?;
        for u in page["users"].as_array().cloned().unwrap_or_default() {
            if json {
                println!("{u}");
            } else {
                println!(
                    "{} {} {}",
                    u["uid"],
                    u["user"].as_str().unwrap_or("?"),
                    u["via"].as_str().unwrap_or("?")
                );
            }
        }
        match page["next_after"]
            .as_u64()
            .and_then(|a| u32::try_from(a).ok())
        {
            Some(a) => after = Some(a),
            None => return Ok(ExitCode::SUCCESS),
        }
    }
}

pub fn status(socket: &Path, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    if let (Some(vm), true) = (&args.vm, args.users) {
        return status_users(socket, vm, args.json);
    }
    let v = match call(socket, &Request::Status {}) {
        Ok(v) => v,
        Err(e) if e.downcast_ref::<crate::control::NotRunning>().is_none() => return Err(e),
        Err(e) => {
            // Not running: still say whether enforcement is pinned.
            let paths = crate::kernel::PinPaths::new(&args.pin.pin_dir);
            let pinned = paths.has_links();
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "running": false, "attached": pinned, "error": format!("{e:#}") })
                );
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
    let s = |p: &str| {
        v.pointer(p).map_or_else(String::new, |x| {
            x.as_str().map_or_else(|| x.to_string(), str::to_owned)
        })
    };
    println!("daemon: running (since {})", s("/started_at"));
    println!("attached: {} (cgroup {})", s("/attached"), s("/cgroup"));
    println!("rule table in force: {}", s("/table_in_force"));
    println!("mode: {}", s("/mode"));
    println!(
        "policy: {} [{}] sha256 {} loaded {}",
        s("/policy/path"),
        s("/policy/source"),
        s("/policy/sha256"),
        s("/policy/loaded_at")
    );
    println!(
        "last reload: {} ok={} {}",
        s("/last_reload/at"),
        s("/last_reload/ok"),
        s("/last_reload/message")
    );
    println!(
        "counts: {} vm(s), {} guarded endpoint(s), {} port(s) guarded everywhere, {} grant(s)",
        s("/counts/vms"),
        s("/counts/guarded_endpoints"),
        s("/counts/ports_guarded_everywhere"),
        s("/counts/grants")
    );
    if v["degraded"].as_bool() == Some(true) {
        println!(
            "DEGRADED: names of the policy that do not resolve are granted nothing until they do:"
        );
        for u in v["unresolved"].as_array().cloned().unwrap_or_default() {
            println!(
                "  {} ({}): {}",
                u["name"].as_str().unwrap_or("?"),
                u["at"].as_str().unwrap_or("?"),
                u["why"].as_str().unwrap_or("?")
            );
        }
    }
    if let Some(ports) = v["listeners"]["ports"].as_array().filter(|p| !p.is_empty()) {
        let users: Vec<String> = v["listeners"]["users"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|u| u["user"].as_str().unwrap_or("?").to_owned())
            .collect();
        println!(
            "listeners: root{}{} may bind the guarded local ports ({} port(s))",
            if users.is_empty() { "" } else { ", " },
            users.join(", "),
            ports.len()
        );
    }
    if let Ok(d) = serde_json::from_value::<crate::denials::DropCounts>(v["drops"].clone()) {
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
    }
    for vm in v["vms"].as_array().cloned().unwrap_or_default() {
        let users: Vec<String> = vm["users"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|u| {
                let t = if u["temporary"].as_bool() == Some(true) {
                    "*"
                } else {
                    ""
                };
                format!("{}{t}", u["user"].as_str().unwrap_or("?"))
            })
            .collect();
        let eps: Vec<String> = vm["endpoints"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.as_str().map(str::to_owned))
            .collect();
        let total = vm["users_total"].as_u64().unwrap_or(users.len() as u64);
        let more = total.saturating_sub(users.len() as u64);
        println!(
            "vm {} [{}]: allowed now: {}{}; connects allowed {} denied {}",
            vm["name"].as_str().unwrap_or("?"),
            eps.join(", "),
            if users.is_empty() {
                "(no one)".into()
            } else {
                users.join(", ")
            },
            if more > 0 {
                format!(
                    " and {more} more (`spicegate status --vm {} --users`)",
                    vm["name"].as_str().unwrap_or("?")
                )
            } else {
                String::new()
            },
            vm["allowed"],
            vm["denied"]
        );
    }
    for g in v["temporary_grants"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        println!(
            "temporary grant: {} on {} until {}",
            g["user"].as_str().unwrap_or("?"),
            g["vm"].as_str().unwrap_or("?"),
            g["expires"].as_str().unwrap_or("revoked")
        );
    }
    Ok(ExitCode::SUCCESS)
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
    let v = call(
        socket,
        &Request::Why {
            user: args.user.clone(),
            addr,
            port,
        },
    )?;
    let allow = v["allow"].as_bool().unwrap_or(false);
    println!(
        "{}: {}",
        if allow { "allow" } else { "deny" },
        v["reason"].as_str().unwrap_or_default()
    );
    if let Some(bind) = v["bind"].as_str() {
        println!("bind: {bind}");
    }
    Ok(if allow {
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
    let v = call(
        socket,
        &Request::Grant {
            user: args.user.clone(),
            vm: args.vm.clone(),
            for_secs,
        },
    )?;
    println!(
        "granted: {} may open {} {}",
        v["user"].as_str().unwrap_or("?"),
        v["vm"].as_str().unwrap_or("?"),
        v["expires"]
            .as_str()
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
    let v = call(
        socket,
        &Request::Revoke {
            user: args.user.clone(),
            vm: args.vm.clone(),
        },
    )?;
    println!(
        "revoked: {} may no longer open {} (by temporary grant)",
        v["user"].as_str().unwrap_or("?"),
        v["vm"].as_str().unwrap_or("?")
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
