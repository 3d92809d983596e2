//! Flags on a real directory: they survive a reopen (the node's restart), `manual_down` holds
//! across it, the limit and its "too many flags" flag, bad files reported and never fatal, writes
//! that fail leave the flag as it was, and the `FLAG_*` text messages end to end.

use nodus_control::flags::store::FLAG_SUFFIX;
use nodus_control::flags::tool;
use nodus_control::flags::{FlagError, FlagKey, FlagReply, FlagRequest, Flags, FlagsConfig, Lowering, Raise};
use nodus_wire::text;
use std::fs;

fn config(limit: usize) -> FlagsConfig {
    FlagsConfig { limit, hostname: "host-a".into(), version: "9.9.9".into() }
}

fn key(name: &str) -> FlagKey {
    FlagKey::new("backup", "nightly", name).unwrap()
}

#[test]
fn flags_survive_a_restart_field_for_field() {
    let dir = tempfile::tempdir().unwrap();
    let (mut flags, problems) = Flags::open(dir.path(), config(100), 1_000).unwrap();
    assert!(problems.is_empty());
    let raise = Raise::new(key("failed"), "disk full\non /backup")
        .priority(60)
        .manual_down(true)
        .tag("disk")
        .tag("Backup")
        .source("backup.sh", "main", 12);
    flags.raise(raise.clone(), 1_000).unwrap();
    flags.raise(raise, 2_000).unwrap();
    flags.raise(Raise::new(key("slow"), "took 3 h"), 2_500).unwrap();
    let before: Vec<_> = flags.set().list().into_iter().cloned().collect();
    assert!(dir.path().join("backup_nightly_failed.flag").is_file(), "one file per flag, named like the reference");
    drop(flags);

    let (flags, problems) = Flags::open(dir.path(), config(100), 9_999).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let after: Vec<_> = flags.set().list().into_iter().cloned().collect();
    assert_eq!(after, before);
    let f = flags.set().get(&key("failed")).unwrap();
    assert_eq!((f.count, f.date, f.modified, f.priority, f.manual_down), (2, 1_000, 2_000, 60, true));
    assert_eq!(f.message, "disk full\non /backup");
    assert_eq!((f.hostname.as_str(), f.version.as_str()), ("host-a", "9.9.9"));
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(FLAG_SUFFIX))
        .collect();
    assert!(leftovers.is_empty(), "atomic writes leave no temporary file: {leftovers:?}");
}

#[test]
fn manual_down_holds_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut flags, _) = Flags::open(dir.path(), config(100), 0).unwrap();
    flags.raise(Raise::new(key("cert"), "certificate expired").manual_down(true), 1).unwrap();
    drop(flags);
    let (mut flags, _) = Flags::open(dir.path(), config(100), 5).unwrap();
    assert_eq!(flags.lower(&key("cert"), Lowering::Automatic), Err(FlagError::ManualDown(key("cert"))));
    assert!(dir.path().join("backup_nightly_cert.flag").exists(), "still on disk");
    assert!(flags.lower(&key("cert"), Lowering::Manual).unwrap().is_some());
    assert!(!dir.path().join("backup_nightly_cert.flag").exists());
    drop(flags);
    let (flags, _) = Flags::open(dir.path(), config(100), 6).unwrap();
    assert!(!flags.set().raised(), "lowered for good");
}

#[test]
fn the_limit_refuses_new_flags_and_raises_too_many() {
    let dir = tempfile::tempdir().unwrap();
    let (mut flags, _) = Flags::open(dir.path(), config(3), 0).unwrap();
    for n in ["a", "b", "c"] {
        flags.raise(Raise::new(key(n), "m"), 1).unwrap();
    }
    assert_eq!(flags.raise(Raise::new(key("d"), "m"), 2), Err(FlagError::TooMany { limit: 3 }));
    assert!(!dir.path().join("backup_nightly_d.flag").exists(), "a refused flag is not saved");
    assert_eq!(flags.set().count(), 4);
    let tm = flags.set().get(&FlagKey::too_many()).unwrap();
    assert_eq!(
        (tm.unit.as_str(), tm.section.as_str(), tm.name.as_str(), tm.priority),
        ("nodus", "flag", "too-many-flags", 97)
    );
    // Like the reference's, the too-many flag is not saved: the node raises it again when needed.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
    flags.lower(&key("a"), Lowering::Automatic).unwrap();
    assert!(flags.set().get(&FlagKey::too_many()).is_none(), "lowered once there is room");
    flags.raise(Raise::new(key("d"), "m"), 3).unwrap();
}

#[test]
fn a_directory_past_the_limit_loads_the_first_and_says_where_the_rest_are() {
    let dir = tempfile::tempdir().unwrap();
    let (mut flags, _) = Flags::open(dir.path(), config(10), 0).unwrap();
    for n in ["a", "b", "c", "d"] {
        flags.raise(Raise::new(key(n), "m"), 1).unwrap();
    }
    drop(flags);
    let (flags, problems) = Flags::open(dir.path(), config(2), 7).unwrap();
    let names: Vec<&str> = flags.set().list().iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "too-many-flags"]);
    assert_eq!(problems.len(), 2);
    assert!(problems.iter().all(|p| p.reason.contains("past the limit of 2 flags")));
    let tm = flags.set().get(&FlagKey::too_many()).unwrap();
    assert!(tm.message.contains(&dir.path().display().to_string()), "{}", tm.message);
    assert!(dir.path().join("backup_nightly_d.flag").exists(), "files past the limit stay for the operator");
}

#[test]
fn bad_files_are_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let (mut flags, _) = Flags::open(dir.path(), config(100), 0).unwrap();
    flags.raise(Raise::new(key("good"), "m"), 1).unwrap();
    drop(flags);
    fs::write(dir.path().join("broken_file_x.flag"), "this is not a flag\n").unwrap();
    fs::write(dir.path().join("a_b_c.flag"), "unit=x\nsection=y\nname=z\nmessage=m\n").unwrap();
    fs::write(dir.path().join("binary_x_y.flag"), [0xff, 0xfe, 0x00]).unwrap();
    fs::write(dir.path().join(".a_b_half.flag.tmp"), "unit=a\nsec").unwrap();
    fs::write(dir.path().join("README"), "not a flag, ignored").unwrap();
    let (flags, problems) = Flags::open(dir.path(), config(100), 2).unwrap();
    assert_eq!(flags.set().count(), 1, "the good flag loads");
    let mut reasons: Vec<(String, String)> = problems
        .iter()
        .map(|p| (p.path.file_name().unwrap().to_string_lossy().into_owned(), p.reason.clone()))
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert_eq!(reasons[0].0, ".a_b_half.flag.tmp");
    assert!(reasons[0].1.contains("removed"));
    assert!(!dir.path().join(".a_b_half.flag.tmp").exists());
    assert!(reasons[1].1.contains("holds flag x/y/z whose file would be x_y_z.flag"), "{:?}", reasons[1]);
    assert!(reasons[2].1.contains("not UTF-8"), "{:?}", reasons[2]);
    assert!(reasons[3].1.contains("line 1 has no `=`"), "{:?}", reasons[3]);
    assert!(dir.path().join("broken_file_x.flag").exists(), "bad files are left for the operator");
}

#[test]
fn a_failed_write_leaves_the_flag_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (mut flags, _) = Flags::open(dir.path(), config(100), 0).unwrap();
    // A directory where the flag's file should be: the rename fails, even for root.
    fs::create_dir(dir.path().join("backup_nightly_blocked.flag")).unwrap();
    fs::write(dir.path().join("backup_nightly_blocked.flag").join("x"), "").unwrap();
    let e = flags.raise(Raise::new(key("blocked"), "m"), 1).unwrap_err();
    assert_eq!(e.code(), "storage");
    assert!(e.to_string().contains("backup_nightly_blocked.flag"), "{e}");
    assert!(flags.set().get(&key("blocked")).is_none(), "not raised in memory either");
    assert!(!dir.path().join(".backup_nightly_blocked.flag.tmp").exists());
    // An existing flag whose update cannot be saved keeps its old state.
    flags.raise(Raise::new(key("ok"), "first"), 1).unwrap();
    let path = dir.path().join("backup_nightly_ok.flag");
    fs::remove_file(&path).unwrap();
    fs::create_dir(&path).unwrap();
    fs::write(path.join("x"), "").unwrap();
    assert!(flags.raise(Raise::new(key("ok"), "second"), 2).is_err());
    let f = flags.set().get(&key("ok")).unwrap();
    assert_eq!((f.message.as_str(), f.count), ("first", 1));
    assert!(flags.lower(&key("ok"), Lowering::Automatic).is_err(), "cannot delete: stays raised");
    assert!(flags.set().get(&key("ok")).is_some());
}

/// What a shell script sees: text lines in, text lines out.
fn exchange(flags: &mut Flags, line: &str, now: i64) -> String {
    let msg = text::from_line(line).unwrap();
    let reply = match FlagRequest::from_message(&msg).and_then(|r| flags.handle(r, now)) {
        Ok(r) => r.reply_to(&msg),
        Err(e) => e.to_reply(&msg),
    };
    text::to_line(&reply)
}

#[test]
fn the_text_protocol_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (mut flags, _) = Flags::open(dir.path(), config(100), 0).unwrap();
    let up = "flags/FLAG_UP unit=backup;section=nightly;name=failed;message=disk full;manual_down=yes;_id=1";
    assert_eq!(
        exchange(&mut flags, up, 10),
        "FLAG_IS_UP count=1;name=failed;new=yes;section=nightly;unit=backup;_reply_to=1"
    );
    assert_eq!(exchange(&mut flags, "flags/FLAG_STATUS _id=2", 11), "FLAG_STATUS count=1;raised=yes;_reply_to=2");
    let down = exchange(&mut flags, "flags/FLAG_DOWN unit=backup;section=nightly;name=failed;_id=3", 12);
    assert!(down.starts_with("ERROR code=manual_down;command=FLAG_DOWN;message="), "{down}");
    assert_eq!(
        exchange(&mut flags, "flags/FLAG_CLEAR unit=backup;section=nightly;name=failed;_id=4", 13),
        "FLAG_IS_DOWN lowered=yes;name=failed;section=nightly;unit=backup;_reply_to=4"
    );
    assert_eq!(
        exchange(&mut flags, "flags/FLAG_DOWN unit=backup;section=nightly;name=failed;_id=5", 14),
        "FLAG_IS_DOWN lowered=no;name=failed;section=nightly;unit=backup;_reply_to=5",
        "lowering what is not raised works every time"
    );
    let bad = exchange(&mut flags, "flags/FLAG_UP unit=backup;section=night_ly;name=x;message=m;_id=6", 15);
    assert!(
        bad.starts_with("INVALID command=FLAG_UP;message=invalid flag section \"night_ly\": it has a character"),
        "{bad}"
    );
    let list = text::from_line(&exchange(&mut flags, "flags/FLAG_LIST _id=7", 16)).unwrap();
    assert_eq!(FlagReply::from_message(&list), Ok(FlagReply::List(vec![])));
}

#[test]
fn the_tool_exit_codes_follow_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (mut flags, _) = Flags::open(dir.path(), config(100), 0).unwrap();
    let status = |flags: &mut Flags, req: FlagRequest| tool::exit_code(&flags.handle(req, 1).unwrap());
    assert_eq!(status(&mut flags, tool::count()), tool::EXIT_OK);
    let up = tool::UpArgs {
        names: ["backup", "nightly", "failed", "disk full"].map(String::from).to_vec(),
        ..Default::default()
    };
    flags.handle(tool::up(&up).unwrap(), 1).unwrap();
    assert_eq!(status(&mut flags, tool::count()), tool::EXIT_RAISED, "count exits 1 when any flag is raised");
    assert_eq!(status(&mut flags, tool::raised(&[]).unwrap()), tool::EXIT_RAISED);
    let other = ["backup", "nightly", "slow"].map(String::from);
    assert_eq!(status(&mut flags, tool::raised(&other).unwrap()), tool::EXIT_OK, "that one is not raised");
    flags.handle(tool::down(&up.names[..3], false).unwrap(), 2).unwrap();
    assert_eq!(status(&mut flags, tool::raised(&[]).unwrap()), tool::EXIT_OK);
}
