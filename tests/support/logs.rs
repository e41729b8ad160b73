//! The pipeline's log lines, captured so a test can assert what an operator
//! would read (an outage reported, a dead letter explained). Lines also go
//! to the test's own output, shown when it fails.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::fmt::{MakeWriter, TestWriter};
use tracing_subscriber::EnvFilter;

static CAPTURED: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Tee(Arc<Mutex<Vec<u8>>>);

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        TestWriter::new().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Tee {
    type Writer = Tee;
    fn make_writer(&'a self) -> Tee {
        self.clone()
    }
}

/// Installs the capturing subscriber once per test process (RUST_LOG
/// overrides the default `pgfanout=info`). Several tests in one process
/// share the capture: match on what identifies your own test.
pub fn capture() -> Logs {
    let buf = CAPTURED.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("pgfanout=info"));
        let _ =
            tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(Tee(buf.clone())).try_init();
        buf
    });
    Logs(buf.clone())
}

pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Captured lines containing every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().filter(|l| needles.iter().all(|n| l.contains(n))).map(str::to_string).collect()
    }
}
