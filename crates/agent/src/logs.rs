//! Instance logs: stdout and stderr share one pipe, so lines interleave as the process writes
//! them; the pump (in the instance's shim, or in the agent for a direct child) writes whole lines to `<data_dir>/logs/<instance>/output.log`, rotating it to
//! `output.log.1`, `output.log.2`, … when it would exceed `max_bytes`. At most `max_files` files
//! exist (the current one included). [`read`] and [`follow`] serve them back.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::AgentError;

/// Name of the current log file in an instance's log directory.
pub const CURRENT: &str = "output.log";

/// Partial lines longer than this are written out without waiting for their newline.
const MAX_LINE: usize = 64 * 1024;

/// Poll interval of [`follow`].
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// `<data_dir>/logs/<instance>`.
pub fn log_dir(data_dir: &Path, instance: &str) -> PathBuf {
    data_dir.join("logs").join(instance)
}

/// Log directories under `<data_dir>/logs` of instances not in `keep` whose newest file was
/// written more than `retention` before `now`: what is left of deleted instances.
pub fn expired_log_dirs(
    data_dir: &Path,
    keep: &std::collections::HashSet<String>,
    retention: std::time::Duration,
    now: std::time::SystemTime,
) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("logs")) else {
        return Vec::new();
    };
    let mut expired = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if keep.contains(&name) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let newest = std::fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|f| f.metadata().ok()?.modified().ok())
            .chain(entry.metadata().ok().and_then(|m| m.modified().ok()))
            .max();
        let old = newest.is_none_or(|t| now.duration_since(t).is_ok_and(|age| age > retention));
        if old {
            expired.push(entry.path());
        }
    }
    expired
}

fn rotated(dir: &Path, n: u32) -> PathBuf {
    if n == 0 {
        dir.join(CURRENT)
    } else {
        dir.join(format!("{CURRENT}.{n}"))
    }
}

/// `write(2)` until all of `data` is written: the system call itself, no buffering and no
/// libc in between (the shim's loop keeps only a few pages of code resident).
fn write_all(file: &File, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match rustix::io::write(file, data) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => data = data.get(n..).unwrap_or_default(),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Size-rotated writer of whole lines.
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    max_bytes: u64,
    max_files: u32,
    file: File,
    size: u64,
}

impl LogWriter {
    pub fn open(dir: &Path, max_bytes: u64, max_files: u32) -> Result<Self, AgentError> {
        std::fs::create_dir_all(dir).map_err(|e| AgentError::io("create log directory", dir, e))?;
        let path = rotated(dir, 0);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| AgentError::io("open log", &path, e))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(1),
            max_files: max_files.max(1),
            file,
            size,
        })
    }

    /// Appends one line (it should end with `\n`), rotating first when it would not fit.
    pub fn write_line(&mut self, line: &[u8]) -> Result<(), AgentError> {
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        write_all(&self.file, line)
            .map_err(|e| AgentError::io("write log", rotated(&self.dir, 0), e))?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// Appends whole lines: in one write when they fit in the current file, else line by line
    /// (each rotating as it must). Every line is tried; the first error is returned.
    pub fn write_lines(&mut self, chunk: &[u8]) -> Result<(), AgentError> {
        if self.size + chunk.len() as u64 <= self.max_bytes {
            write_all(&self.file, chunk)
                .map_err(|e| AgentError::io("write log", rotated(&self.dir, 0), e))?;
            self.size += chunk.len() as u64;
            return Ok(());
        }
        let mut first = Ok(());
        for line in chunk.split_inclusive(|b| *b == b'\n') {
            if let Err(e) = self.write_line(line)
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    fn rotate(&mut self) -> Result<(), AgentError> {
        let keep = self.max_files - 1;
        if keep == 0 {
            let path = rotated(&self.dir, 0);
            self.file
                .set_len(0)
                .map_err(|e| AgentError::io("truncate log", &path, e))?;
            self.size = 0;
            return Ok(());
        }
        let oldest = rotated(&self.dir, keep);
        let _ = std::fs::remove_file(&oldest);
        for n in (1..keep).rev() {
            let from = rotated(&self.dir, n);
            if from.exists() {
                let to = rotated(&self.dir, n + 1);
                std::fs::rename(&from, &to).map_err(|e| AgentError::io("rotate log", &from, e))?;
            }
        }
        let cur = rotated(&self.dir, 0);
        let to = rotated(&self.dir, 1);
        std::fs::rename(&cur, &to).map_err(|e| AgentError::io("rotate log", &cur, e))?;
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cur)
            .map_err(|e| AgentError::io("open log", &cur, e))?;
        self.size = 0;
        Ok(())
    }
}

/// Whole lines into a [`LogWriter`]: output is cut at its last newline (a partial line longer
/// than [`MAX_LINE`] is written without waiting for its newline), the rest waits for more.
#[derive(Debug)]
pub struct LineSink {
    writer: LogWriter,
    pending: Vec<u8>,
    instance: String,
    warned: bool,
}

impl LineSink {
    pub fn new(writer: LogWriter, instance: impl Into<String>) -> Self {
        Self {
            writer,
            pending: Vec::new(),
            instance: instance.into(),
            warned: false,
        }
    }

    /// Takes `data`, writes every line it completes. Output that arrives in whole lines is
    /// written straight from `data`; nothing is allocated once the pending buffer has grown.
    pub fn feed(&mut self, data: &[u8]) {
        if self.pending.is_empty() {
            let cut = complete(data);
            self.write(&data[..cut]);
            self.pending.extend_from_slice(&data[cut..]);
            return;
        }
        self.pending.extend_from_slice(data);
        let cut = complete(&self.pending);
        let pending = std::mem::take(&mut self.pending);
        self.write(&pending[..cut]);
        self.pending = pending;
        self.pending.drain(..cut);
    }

    /// Writes what is left as a last line.
    pub fn finish(&mut self) {
        if !self.pending.is_empty() {
            let mut last = std::mem::take(&mut self.pending);
            last.push(b'\n');
            self.write(&last);
        }
    }

    fn write(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        if let Err(e) = self.writer.write_lines(chunk)
            && !self.warned
        {
            tracing::warn!(instance = %self.instance, error = %e, "cannot write instance log");
            self.warned = true;
        }
    }
}

/// How much of `buf` is whole lines: up to its last newline; all of it once it holds
/// [`MAX_LINE`] bytes without one; else nothing.
fn complete(buf: &[u8]) -> usize {
    match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None if buf.len() >= MAX_LINE => buf.len(),
        None => 0,
    }
}

/// Copies `src` into the log, line by line, until EOF or `cancel`.
pub async fn pump<R: AsyncRead + Unpin>(mut src: R, mut sink: LineSink, cancel: CancellationToken) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            _ = cancel.cancelled() => break,
            r = src.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(instance = %sink.instance, error = %e, "reading process output failed");
                    break;
                }
            },
        };
        sink.feed(&buf[..n]);
    }
    sink.finish();
}

/// [`pump`] on a thread of its own, for the shim: until EOF or a read error.
pub fn pump_blocking(mut src: impl std::io::Read, mut sink: LineSink) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => sink.feed(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    sink.finish();
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    // Oldest first: the highest rotation number that exists, down to the current file.
    let mut files = Vec::new();
    let mut n = 1;
    while rotated(dir, n).exists() && n < 10_000 {
        n += 1;
    }
    for k in (1..n).rev() {
        files.push(rotated(dir, k));
    }
    files.push(rotated(dir, 0));
    files
}

fn last_lines(data: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &data[data.len()..];
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut count = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            count += 1;
            if count == n {
                return &data[i + 1..];
            }
        }
    }
    data
}

fn read_all(dir: &Path, instance: &str, current_limit: Option<u64>) -> Result<Vec<u8>, AgentError> {
    if !dir.is_dir() {
        return Err(AgentError::LogNotFound {
            instance: instance.to_string(),
            dir: dir.to_path_buf(),
        });
    }
    let mut out = Vec::new();
    let files = log_files(dir);
    let last = files.len().saturating_sub(1);
    for (i, f) in files.iter().enumerate() {
        match std::fs::read(f) {
            Ok(mut data) => {
                if i == last
                    && let Some(limit) = current_limit
                {
                    data.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
                }
                out.extend_from_slice(&data);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AgentError::io("read log", f, e)),
        }
    }
    Ok(out)
}

/// The instance's log (all retained files, oldest first), or its last `tail_lines` lines.
pub async fn read(
    data_dir: &Path,
    instance: &str,
    tail_lines: Option<usize>,
) -> Result<Vec<u8>, AgentError> {
    let dir = log_dir(data_dir, instance);
    let instance = instance.to_string();
    let join = tokio::task::spawn_blocking(move || {
        let data = read_all(&dir, &instance, None)?;
        Ok(match tail_lines {
            Some(n) => last_lines(&data, n).to_vec(),
            None => data,
        })
    })
    .await;
    match join {
        Ok(r) => r,
        Err(e) => Err(AgentError::io(
            "read log",
            data_dir.to_path_buf(),
            std::io::Error::other(e.to_string()),
        )),
    }
}

/// Streams the instance's log: first the retained content (or its last `tail_lines` lines),
/// then new output as it is written, across rotations. Once `stop` is cancelled, what was
/// written up to then is still sent and the stream ends; it also ends when the receiver is
/// dropped. An instance whose log does not exist yet (not started) is waited for. The channel
/// is bounded: a slow reader slows the follower, not the instance.
pub fn follow(
    data_dir: &Path,
    instance: &str,
    tail_lines: Option<usize>,
    stop: CancellationToken,
) -> mpsc::Receiver<Result<Bytes, AgentError>> {
    let (tx, rx) = mpsc::channel(64);
    let dir = log_dir(data_dir, instance);
    let instance = instance.to_string();
    tokio::spawn(async move {
        tokio::select! {
            _ = tx.closed() => {}
            r = follow_loop(&dir, &instance, tail_lines, &tx, &stop) => {
                if let Err(e) = r {
                    let _ = tx.send(Err(e)).await;
                }
            }
        }
    });
    rx
}

/// Sleeps one poll interval; false when `stop` was cancelled (before or meanwhile).
async fn poll_pause(stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(FOLLOW_POLL) => true,
    }
}

async fn follow_loop(
    dir: &Path,
    instance: &str,
    tail_lines: Option<usize>,
    tx: &mpsc::Sender<Result<Bytes, AgentError>>,
    stop: &CancellationToken,
) -> Result<(), AgentError> {
    use std::os::unix::fs::MetadataExt;
    let cur = rotated(dir, 0);
    // Wait for the current file to exist (an instance that has not started yet).
    let mut file = loop {
        match tokio::fs::File::open(&cur).await {
            Ok(f) => break f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !poll_pause(stop).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(AgentError::io("open log", &cur, e)),
        }
    };
    let meta = file
        .metadata()
        .await
        .map_err(|e| AgentError::io("stat log", &cur, e))?;
    let mut inode = meta.ino();
    let mut pos = meta.len();
    let initial = {
        let (dir2, inst2) = (dir.to_path_buf(), instance.to_string());
        tokio::task::spawn_blocking(move || read_all(&dir2, &inst2, Some(pos)))
            .await
            .map_err(|e| AgentError::io("read log", dir, std::io::Error::other(e.to_string())))??
    };
    let initial = match tail_lines {
        Some(n) => last_lines(&initial, n).to_vec(),
        None => initial,
    };
    if !initial.is_empty() && tx.send(Ok(Bytes::from(initial))).await.is_err() {
        return Ok(());
    }
    file.seek(std::io::SeekFrom::Start(pos))
        .await
        .map_err(|e| AgentError::io("seek log", &cur, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Drain what is there.
        loop {
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| AgentError::io("read log", &cur, e))?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            if tx
                .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        if stop.is_cancelled() {
            // Everything written before the stop was sent.
            return Ok(());
        }
        // Stopped while pausing: one more round drains what was written meanwhile.
        poll_pause(stop).await;
        match tokio::fs::metadata(&cur).await {
            Ok(m) if m.ino() != inode => {
                // Rotated: drain the old file (done above on the next round), then switch.
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| AgentError::io("read log", &cur, e))?;
                if n > 0 {
                    pos += n as u64;
                    if tx
                        .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                    continue;
                }
                match tokio::fs::File::open(&cur).await {
                    Ok(f) => {
                        file = f;
                        inode = m.ino();
                        pos = 0;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(AgentError::io("open log", &cur, e)),
                }
            }
            Ok(m) if m.len() < pos => {
                // Truncated in place (max_files = 1).
                file.seek(std::io::SeekFrom::Start(0))
                    .await
                    .map_err(|e| AgentError::io("seek log", &cur, e))?;
                pos = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn rotation_keeps_max_files_of_whole_lines() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("logs/i");
        let mut w = LogWriter::open(&dir, 100, 3).unwrap();
        for i in 0..30 {
            w.write_line(format!("line {i:04} ..........\n").as_bytes())
                .unwrap();
        }
        let names: Vec<String> = {
            let mut v: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names, vec!["output.log", "output.log.1", "output.log.2"]);
        for n in &names {
            let s = std::fs::read_to_string(dir.join(n)).unwrap();
            assert!(s.len() <= 100, "{n} has {} bytes", s.len());
            assert!(s.ends_with('\n'));
            assert!(
                s.lines().all(|l| l.starts_with("line ") && l.len() == 20),
                "{s}"
            );
        }
        let cur = std::fs::read_to_string(dir.join("output.log")).unwrap();
        assert!(cur.contains("line 0029"));
    }

    #[test]
    fn single_file_truncates() {
        let t = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(t.path(), 10, 1).unwrap();
        w.write_line(b"aaaaaaa\n").unwrap();
        w.write_line(b"bbbbbbb\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join(CURRENT)).unwrap(),
            "bbbbbbb\n"
        );
    }

    #[test]
    fn tail() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
    }

    #[tokio::test]
    async fn pump_read_and_follow_across_rotation() {
        let t = tempfile::tempdir().unwrap();
        let dir = log_dir(t.path(), "web-1");
        let sink = LineSink::new(LogWriter::open(&dir, 64, 3).unwrap(), "web-1");
        let input: &[u8] = b"one\ntwo\nthree-without-newline";
        pump(input, sink, CancellationToken::new()).await;
        let w = Mutex::new(LogWriter::open(&dir, 64, 3).unwrap());
        let all = read(t.path(), "web-1", None).await.unwrap();
        assert_eq!(all, b"one\ntwo\nthree-without-newline\n");
        assert_eq!(
            read(t.path(), "web-1", Some(1)).await.unwrap(),
            b"three-without-newline\n"
        );
        assert!(matches!(
            read(t.path(), "nope", None).await,
            Err(AgentError::LogNotFound { .. })
        ));

        let stop = CancellationToken::new();
        let mut rx = follow(t.path(), "web-1", Some(2), stop.clone());
        let mut got = Vec::new();
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.extend_from_slice(&first);
        assert_eq!(got, b"two\nthree-without-newline\n");
        // Write enough to rotate several times; follow must see every line exactly once.
        let mut expect = got.clone();
        for i in 0..20 {
            let line = format!("follow line {i:02}\n");
            w.lock().unwrap().write_line(line.as_bytes()).unwrap();
            expect.extend_from_slice(line.as_bytes());
            if i % 2 == 1 {
                // at most one rotation between two polls of the follower (like tail -F, a
                // follower cannot see a file that was rotated twice before it looked)
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while got.len() < expect.len() {
                    let Ok(c) = tokio::time::timeout_at(deadline, rx.recv()).await else {
                        panic!(
                            "follow stalled:\n got {:?}\n want {:?}",
                            String::from_utf8_lossy(&got),
                            String::from_utf8_lossy(&expect)
                        );
                    };
                    let c = c.unwrap().unwrap();
                    got.extend_from_slice(&c);
                }
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expect)
        );
        stop.cancel();
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(end.is_none());
    }

    #[test]
    fn only_old_log_dirs_of_gone_instances_expire() {
        use std::collections::HashSet;
        use std::time::{Duration, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let old = SystemTime::now() - 2 * hour;
        for name in ["gone-old", "gone-new", "alive-old"] {
            let d = log_dir(dir.path(), name);
            std::fs::create_dir_all(&d).unwrap();
            let f = std::fs::File::create(d.join("output.log")).unwrap();
            if name.ends_with("old") {
                f.set_modified(old).unwrap();
                std::fs::File::open(&d).unwrap().set_modified(old).unwrap();
            }
        }
        let keep: HashSet<String> = HashSet::from(["alive-old".to_string()]);
        let expired = expired_log_dirs(dir.path(), &keep, hour, SystemTime::now());
        assert_eq!(expired, vec![log_dir(dir.path(), "gone-old")]);
    }
}
