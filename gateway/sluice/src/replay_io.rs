//! `ReplayIo`: a Pingora `Stream` wrapper that can read ahead and hand what it read back to the
//! next reader. It is itself a concrete `IO` type, so a stream that already went through the PROXY
//! header and ClientHello peek can be given to Pingora's TLS handshake, which takes one.
//!
//! The read-ahead is what lets an idle keep-alive connection wait for its next request without
//! Pingora's per-request state: the listener waits in [`ReplayIo::try_peek`], and only when a
//! request starts does it build the next HTTP session. The wait is the read the session would
//! have made, so it costs no extra system call. Its buffer is the one thing an idle connection
//! holds besides its socket: 1 KiB, as nginx's `client_header_buffer_size` ([`FIRST_READ`]); it
//! is freed once handed over, and a longer request head is read on in the session's read.
//!
//! On an HTTP connection ([`ReplayIo::for_http`]) it also gathers writes until the session flushes,
//! so a response head and a small body leave in one send. Its buffer too exists only while
//! something is pending: connections are accepted without Pingora's L4 write buffer, which an idle
//! connection would keep.
//!
//! And it follows where each request ends in what it hands over ([`Framing`]). A client may send
//! its next request before the answer to the last (pipelining, RFC 9112 §9.3.2); Pingora keeps
//! whatever it read past a request for the next session, so those bytes are no longer in the
//! socket, and the listener must not wait for the socket then ([`ReplayIo::next_request`]).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BufMut;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The most read ahead at once, and the most [`Peek::try_peek`] can be asked for: Pingora's HTTP/1
/// session reads a request head in 4 KiB steps too.
const READ_AHEAD: usize = 4096;

/// What the first read of a request takes (nginx's `client_header_buffer_size`): most request
/// heads fit in it, and an idle connection waiting to read holds no more than this. The rest of a
/// longer head is read on when the session reads.
const FIRST_READ: usize = 1024;

/// Writes gathered before a send; a longer write goes out directly. Pingora's HTTP/1 session
/// flushes at the end of every response, and after each chunk of a streamed one.
const WRITE_GATHER: usize = 4096;

#[derive(Debug)]
pub struct ReplayIo {
    inner: Stream,
    /// Bytes read ahead and not yet handed out: `ahead[start..]`. Empty, with no allocation,
    /// whenever nothing is pending.
    ahead: Vec<u8>,
    start: usize,
    gather_writes: bool,
    /// Written and not yet sent: `pending[sent..]`. Empty, with no allocation, after each flush.
    pending: Vec<u8>,
    sent: usize,
    /// A read error met while handing over bytes read ahead: the kernel reports a reset only once,
    /// so it is kept for the next read rather than read again as a clean end.
    deferred_error: Option<std::io::Error>,
    /// Where the current HTTP/1 request ends in what was handed over; HTTP streams only.
    framing: Option<Framing>,
}

/// How far the bytes handed to the HTTP/1 session go into the current request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Still in the head. `tail`: its last two bytes so far, to find an empty line split across
    /// reads; `started`: some of it was handed over before, so the head is not in one piece.
    Head { tail: [u8; 2], started: bool },
    /// In the body, with this many bytes still to come; `None` when the head does not tell
    /// (chunked, a `Content-Length` that does not parse, or a head that came in pieces).
    Body(Option<u64>),
    /// Bytes past the request's end were handed over, or past a body of unknown length: the
    /// session may hold the start of the next request.
    Past,
}

impl Framing {
    const NEXT_REQUEST: Framing = Framing::Head {
        tail: [0; 2],
        started: false,
    };

    fn advance(&mut self, mut bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Framing::Head { tail, started } = *self {
            let Some((end, length)) = head_end(tail, bytes, !started) else {
                let tail = match bytes {
                    [.., a, b] => [*a, *b],
                    [b] => [tail[1], *b],
                    [] => tail,
                };
                *self = Framing::Head {
                    tail,
                    started: true,
                };
                return;
            };
            *self = Framing::Body(length);
            bytes = &bytes[end..];
            if bytes.is_empty() {
                return;
            }
        }
        let handed = bytes.len() as u64;
        *self = match *self {
            Framing::Body(Some(left)) if handed <= left => Framing::Body(Some(left - handed)),
            _ => Framing::Past,
        };
    }
}

/// Where a request head ends in `bytes`: just past its empty line (CRLF CRLF, or the bare LF LF
/// httparse accepts too), given the two bytes handed over before them. With it, when `bytes` hold
/// the head from its first byte, the body length the head declares: 0 with neither
/// `Content-Length` nor `Transfer-Encoding` (RFC 9112 §6.3), `None` with `Transfer-Encoding` or a
/// `Content-Length` that does not parse (Pingora rejects or frames those itself).
fn head_end(tail: [u8; 2], bytes: &[u8], whole: bool) -> Option<(usize, Option<u64>)> {
    const CONTENT_LENGTH: &[u8] = b"content-length:";
    const TRANSFER_ENCODING: &[u8] = b"transfer-encoding:";
    let before = |at: usize, back: usize| match at.checked_sub(back) {
        Some(i) => bytes[i],
        None => tail[2 + at - back],
    };
    let mut length = whole.then_some(0);
    // The portable word-at-a-time search: heads are short, and the SIMD one's set-up per line
    // cost more here (callgrind).
    for at in memchr::arch::all::memchr::One::new(b'\n').iter(bytes) {
        if before(at, 1) == b'\n' || (before(at, 1) == b'\r' && before(at, 2) == b'\n') {
            return Some((at + 1, length));
        }
        if length.is_none() {
            continue;
        }
        let line = &bytes[at + 1..];
        let named = |name: &[u8]| {
            line.get(..name.len())
                .is_some_and(|l| l.eq_ignore_ascii_case(name))
        };
        if named(TRANSFER_ENCODING) {
            length = None;
        } else if named(CONTENT_LENGTH) {
            let value = &line[CONTENT_LENGTH.len()..];
            let value = &value[..value
                .iter()
                .position(|&b| b == b'\n')
                .unwrap_or(value.len())];
            // Digits only, as Pingora reads it (`parse` would also take a sign).
            let digits = value.trim_ascii();
            length = (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(digits).ok()?.parse().ok())
                .flatten();
        }
    }
    None
}

impl ReplayIo {
    /// Writes pass straight through: for a stream under TLS, whose own writes are records.
    pub fn new(inner: Stream) -> Self {
        Self {
            inner,
            ahead: Vec::new(),
            start: 0,
            gather_writes: false,
            pending: Vec::new(),
            sent: 0,
            deferred_error: None,
            framing: None,
        }
    }

    /// For the stream an HTTP session reads and writes: writes are gathered until flushed, and
    /// requests are followed to their end.
    pub fn for_http(inner: Stream) -> Self {
        let mut io = Self::new(inner);
        io.gather_writes = true;
        io.framing = Some(Framing::NEXT_REQUEST);
        io
    }

    /// For a connection that turned out to speak HTTP/2, whose frames carry their own lengths.
    pub fn stop_following_requests(&mut self) {
        self.framing = None;
    }

    /// Starts following the connection's next request. True when the last session was handed
    /// bytes past its request's end: Pingora keeps those for the next session, so the next
    /// request may already be read, and waiting for the socket would stall it. Meaningful only for
    /// a session that started with no bytes kept by Pingora from the session before it.
    pub fn begin_next_request(&mut self) -> bool {
        let past = self.framing == Some(Framing::Past);
        if self.framing.is_some() {
            self.framing = Some(Framing::NEXT_REQUEST);
        }
        past
    }

    fn poll_send_pending(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.pending.len() {
            let unsent = &self.pending[self.sent..];
            let written = ready!(Pin::new(&mut *self.inner).poll_write(cx, unsent))?;
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += written;
        }
        self.pending = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    fn buffered(&self) -> &[u8] {
        &self.ahead[self.start..]
    }

    /// Reads ahead until `wanted` bytes (at most [`READ_AHEAD`]) are buffered, or `stop` says the
    /// bytes so far already decide. An early end of stream is an error, as for `read_exact`.
    async fn read_ahead(
        &mut self,
        wanted: usize,
        stop: impl Fn(&[u8]) -> bool,
    ) -> std::io::Result<&[u8]> {
        if self.start > 0 {
            self.ahead.drain(..self.start);
            self.start = 0;
        }
        while self.ahead.len() < wanted.min(READ_AHEAD) && !stop(&self.ahead) {
            let room = if self.ahead.is_empty() {
                FIRST_READ
            } else {
                READ_AHEAD - self.ahead.len()
            };
            self.ahead.reserve_exact(room);
            let mut spare = (&mut self.ahead).limit(room);
            let read = self.inner.read_buf(&mut spare).await?;
            if read == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buffered())
    }

    /// Whether the connection opens with the HTTP/2 preface (h2c with prior knowledge). Reads only
    /// as far as the first byte that differs, so a short HTTP/1 request is never kept waiting for
    /// 24 bytes that will not come.
    pub async fn starts_with_h2_preface(&mut self) -> std::io::Result<bool> {
        let differs = |seen: &[u8]| {
            let common = seen.len().min(H2_PREFACE.len());
            seen[..common] != H2_PREFACE[..common]
        };
        let seen = self.read_ahead(H2_PREFACE.len(), differs).await?;
        Ok(seen.starts_with(H2_PREFACE))
    }
}

impl AsyncRead for ReplayIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let from = buf.filled().len();
        let read = this.poll_read_replaying(cx, buf);
        if let (Poll::Ready(Ok(())), Some(framing)) = (&read, &mut this.framing) {
            framing.advance(&buf.filled()[from..]);
        }
        read
    }
}

impl ReplayIo {
    /// The read itself: bytes read ahead first, then the stream.
    fn poll_read_replaying(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.ahead.is_empty() {
            if let Some(error) = self.deferred_error.take() {
                return Poll::Ready(Err(error));
            }
            return Pin::new(&mut *self.inner).poll_read(cx, buf);
        }
        let replayed = self.buffered().len().min(buf.remaining());
        buf.put_slice(&self.ahead[self.start..self.start + replayed]);
        self.start += replayed;
        if self.start < self.ahead.len() {
            return Poll::Ready(Ok(()));
        }
        // All handed over: an idle connection keeps no buffer.
        self.ahead = Vec::new();
        self.start = 0;
        // A request longer than the read-ahead has more waiting: hand it over in the same call so
        // the reader parses the request once, not once per fragment. Not ready yet is fine: the
        // bytes replayed are the answer to this read.
        if buf.remaining() > 0 {
            let before = buf.filled().len();
            match Pin::new(&mut *self.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) | Poll::Pending => {}
                // Reported by the next read, after the bytes already handed out.
                Poll::Ready(Err(error)) => {
                    buf.set_filled(before);
                    self.deferred_error = Some(error);
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReplayIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if !this.gather_writes {
            return Pin::new(&mut *this.inner).poll_write(cx, buf);
        }
        if this.pending.len() + buf.len() > WRITE_GATHER {
            ready!(this.poll_send_pending(cx))?;
        }
        if buf.len() >= WRITE_GATHER {
            return Pin::new(&mut *this.inner).poll_write(cx, buf);
        }
        if this.pending.is_empty() {
            this.pending.reserve_exact(WRITE_GATHER);
        }
        this.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_send_pending(cx))?;
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_send_pending(cx))?;
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if !self.gather_writes {
            return Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs);
        }
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &**b);
        self.poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        !self.gather_writes && self.inner.is_write_vectored()
    }
}

/// A session dropped without a flush (Pingora gives up on a response whose upstream failed
/// mid-body) still sends what it wrote, as far as the socket takes it now: the client gets the
/// partial response rather than nothing. Pingora's own L4 stream does the same when dropped.
impl Drop for ReplayIo {
    fn drop(&mut self) {
        if self.sent < self.pending.len() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let _ = self.poll_send_pending(&mut cx);
        }
    }
}

/// Fills `buf` with the next bytes of the stream without consuming them, waiting until that many
/// have arrived (Pingora's `Peek` contract; at most [`READ_AHEAD`] bytes).
#[async_trait]
impl Peek for ReplayIo {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        if buf.len() > READ_AHEAD {
            return Ok(false);
        }
        let seen = self.read_ahead(buf.len(), |_| false).await?;
        buf.copy_from_slice(&seen[..buf.len()]);
        Ok(true)
    }
}

#[async_trait]
impl Shutdown for ReplayIo {
    async fn shutdown(&mut self) {
        // What was gathered goes out before the close.
        let _ = poll_fn(|cx| self.poll_send_pending(cx)).await;
        self.inner.shutdown().await
    }
}

impl UniqueID for ReplayIo {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ReplayIo {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ReplayIo {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ReplayIo {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for ReplayIo {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    fn replay(bytes: &'static [u8]) -> ReplayIo {
        ReplayIo::new(Box::new(std::io::Cursor::new(bytes.to_vec())))
    }

    /// Hands `pieces` over as successive reads and says whether they went past the request.
    fn framing_after(pieces: &[&[u8]]) -> Framing {
        let mut framing = Framing::NEXT_REQUEST;
        for piece in pieces {
            framing.advance(piece);
        }
        framing
    }

    #[test]
    fn framing_finds_where_a_request_ends() {
        let get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(framing_after(&[get]), Framing::Body(Some(0)));
        // Split anywhere, the head still ends where it ends; its length is then not read.
        for at in 1..get.len() {
            let framing = framing_after(&[&get[..at], &get[at..]]);
            assert!(
                matches!(framing, Framing::Body(_)),
                "split at {at}: {framing:?}"
            );
        }
        assert_eq!(
            framing_after(&[b"GET / HTTP/1.1\nHost: a\n\n"]),
            Framing::Body(Some(0))
        );
        // An empty line before the request line is allowed (RFC 9112 §2.2); two are taken for the
        // end of a head, which can only err towards "past".
        let after_empty_line = [&b"\r\n"[..], &get[..]].concat();
        assert_eq!(framing_after(&[&after_empty_line]), Framing::Body(Some(0)));
        assert_eq!(framing_after(&[b"\r\n\r\n", get]), Framing::Past);

        let pipelined = [&get[..], &get[..]].concat();
        assert_eq!(framing_after(&[&pipelined]), Framing::Past);
        let mut probed = framing_after(&[get]);
        probed.advance(b"G");
        assert_eq!(probed, Framing::Past);

        let post = b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length:  5 \r\n\r\n";
        assert_eq!(
            framing_after(&[post, b"hel", b"lo"]),
            Framing::Body(Some(0))
        );
        assert_eq!(
            framing_after(&[&[&post[..], b"hello"].concat()]),
            Framing::Body(Some(0))
        );
        assert_eq!(framing_after(&[post, b"hello!"]), Framing::Past);
        assert_eq!(framing_after(&[post, b"hel"]), Framing::Body(Some(2)));

        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(framing_after(&[chunked]), Framing::Body(None));
        assert_eq!(framing_after(&[chunked, b"0\r\n\r\n"]), Framing::Past);
        let unreadable = b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n";
        assert_eq!(framing_after(&[unreadable]), Framing::Body(None));
        let signed = b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n";
        assert_eq!(framing_after(&[signed]), Framing::Body(None));
    }

    #[tokio::test]
    async fn a_session_reading_past_its_request_is_reported_once() {
        let mut io = ReplayIo::for_http(Box::new(std::io::Cursor::new(
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n".to_vec(),
        )));
        let mut first = [0u8; 1];
        assert!(io.try_peek(&mut first).await.unwrap());
        assert!(!io.begin_next_request(), "nothing handed over yet");
        let mut buf = [0u8; 64];
        let read = io.read(&mut buf).await.unwrap();
        assert_eq!(read, 38, "both requests in one read");
        assert!(io.begin_next_request());
        assert!(!io.begin_next_request(), "each request is followed anew");
    }

    #[tokio::test]
    async fn short_http1_request_is_not_mistaken_for_h2() {
        let mut io = replay(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!io.starts_with_h2_preface().await.unwrap());
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.0\r\n\r\n");
    }

    #[tokio::test]
    async fn h2_preface_is_detected_and_replayed() {
        let mut io = replay(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nframes");
        assert!(io.starts_with_h2_preface().await.unwrap());
        let mut peeked = [0u8; 24];
        assert!(io.try_peek(&mut peeked).await.unwrap());
        assert_eq!(&peeked, H2_PREFACE);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nframes");
    }

    #[tokio::test]
    async fn peeked_byte_comes_back_with_what_follows() {
        let mut io = replay(b"GET /next HTTP/1.1\r\n\r\n");
        let mut first = [0u8; 1];
        assert!(io.try_peek(&mut first).await.unwrap());
        assert_eq!(&first, b"G");
        let mut buf = [0u8; 64];
        let read = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..read], b"GET /next HTTP/1.1\r\n\r\n");
    }

    /// A `ReplayIo` over one end of a real socket pair, and the other end.
    fn socket_pair(for_http: bool) -> (ReplayIo, tokio::net::UnixStream) {
        let (ours, peer) = tokio::net::UnixStream::pair().unwrap();
        let inner: Stream = Box::new(ours);
        let io = if for_http {
            ReplayIo::for_http(inner)
        } else {
            ReplayIo::new(inner)
        };
        (io, peer)
    }

    async fn read_n(peer: &mut tokio::net::UnixStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        let read = tokio::time::timeout(Duration::from_secs(5), peer.read_exact(&mut got));
        read.await.unwrap().unwrap();
        got
    }

    #[tokio::test]
    async fn response_head_and_small_body_leave_together_on_flush() {
        let (mut io, mut peer) = socket_pair(true);
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
            .await
            .unwrap();
        io.write_all(b"ok").await.unwrap();
        let mut probe = [0u8; 1];
        let early = peer.try_read(&mut probe);
        assert_eq!(early.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        io.flush().await.unwrap();
        let all = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(read_n(&mut peer, all.len()).await, all);
        assert_eq!(io.pending.capacity(), 0, "flushed: no buffer kept");
    }

    #[tokio::test]
    async fn a_long_write_goes_out_at_once_after_what_is_pending() {
        let (mut io, mut peer) = socket_pair(true);
        io.write_all(b"head").await.unwrap();
        let long = vec![b'x'; WRITE_GATHER];
        io.write_all(&long).await.unwrap();
        // No flush: the peer still gets both, in order.
        let got = read_n(&mut peer, 4 + long.len()).await;
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[4..], &long[..]);
    }

    #[tokio::test]
    async fn closing_sends_what_is_pending() {
        let (mut io, mut peer) = socket_pair(true);
        io.write_all(b"last words").await.unwrap();
        Shutdown::shutdown(&mut io).await;
        // Sent by the close itself, while the stream is still alive (not by dropping it).
        assert_eq!(read_n(&mut peer, 10).await, b"last words");
    }

    #[tokio::test]
    async fn dropped_without_a_flush_it_still_sends_what_was_written() {
        let (mut io, mut peer) = socket_pair(true);
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\npart")
            .await
            .unwrap();
        drop(io);
        let mut all = Vec::new();
        peer.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\npart");
    }

    #[tokio::test]
    async fn without_gathering_writes_pass_straight_through() {
        let (mut io, mut peer) = socket_pair(false);
        io.write_all(b"record").await.unwrap();
        assert_eq!(read_n(&mut peer, 6).await, b"record");
    }

    #[tokio::test]
    async fn a_request_head_longer_than_the_first_read_is_read_whole() {
        let (mut io, mut peer) = socket_pair(true);
        let head = format!("GET / HTTP/1.1\r\ncookie: {}\r\n\r\n", "c".repeat(2500));
        peer.write_all(head.as_bytes()).await.unwrap();
        let mut first = [0u8; 1];
        assert!(io.try_peek(&mut first).await.unwrap());
        assert_eq!(io.ahead.capacity(), FIRST_READ);
        // One read of the session's size hands over the peeked part and the rest together.
        let mut buf = vec![0u8; READ_AHEAD];
        let read = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..read], head.as_bytes());
    }

    #[tokio::test]
    async fn peek_at_end_of_stream_is_an_error() {
        let mut io = replay(b"");
        let mut first = [0u8; 1];
        assert!(io.try_peek(&mut first).await.is_err());
    }
}
