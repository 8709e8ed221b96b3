//! Reading a child's output with a cap: the first `cap` bytes are kept, the rest is read and
//! dropped (so the child never blocks on a full pipe), and the cut is flagged.

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

/// Size of the read buffer.
const CHUNK: usize = 16 * 1024;

/// What was captured from one stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Captured {
    pub(crate) bytes: Vec<u8>,
    pub(crate) truncated: bool,
}

/// Reads `reader` to its end (or until `stop` fires), keeping at most `cap` bytes.
pub(crate) async fn read_capped<R>(mut reader: R, cap: usize, stop: CancellationToken) -> Captured
where
    R: AsyncRead + Unpin,
{
    let mut captured = Captured::default();
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = tokio::select! {
            read = reader.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = stop.cancelled() => break,
        };
        let room = cap.saturating_sub(captured.bytes.len());
        captured.bytes.extend_from_slice(&chunk[..n.min(room)]);
        if n > room {
            captured.truncated = true;
        }
    }
    captured
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_first_bytes_and_flags_the_cut() {
        let data = vec![7u8; 100_000];
        let got = read_capped(&data[..], 1000, CancellationToken::new()).await;
        assert_eq!(got.bytes.len(), 1000);
        assert!(got.truncated);
        let got = read_capped(&data[..], 100_000, CancellationToken::new()).await;
        assert_eq!(got.bytes.len(), 100_000);
        assert!(!got.truncated);
        let got = read_capped(&b""[..], 0, CancellationToken::new()).await;
        assert_eq!(got, Captured::default());
    }
}
