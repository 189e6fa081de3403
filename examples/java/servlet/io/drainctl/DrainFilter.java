package io.drainctl;

import java.io.IOException;
import java.io.PrintWriter;
import java.net.InetAddress;
import java.net.UnknownHostException;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.HashSet;
import java.util.Set;
import java.util.concurrent.atomic.AtomicBoolean;
import jakarta.servlet.Filter;
import jakarta.servlet.FilterChain;
import jakarta.servlet.FilterConfig;
import jakarta.servlet.ServletException;
import jakarta.servlet.ServletOutputStream;
import jakarta.servlet.ServletRequest;
import jakarta.servlet.ServletResponse;
import jakarta.servlet.WriteListener;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import jakarta.servlet.http.HttpServletResponseWrapper;

/**
 * drainctl's app-side contract as a Servlet Filter.
 *
 * <p>This source uses the Jakarta namespace (Servlet 5+: Tomcat 10+, Jetty 11+, Spring Boot 3);
 * build/java.py compiles it into {@code dist/drainctl-servlet-jakarta.jar} and, with the imports
 * rewritten to the {@code javax} namespace, into {@code dist/drainctl-servlet-javax.jar}
 * (Servlet 3.1/4: Tomcat 9, Jetty 9/10, Spring Boot 2). Nothing else differs: keep every
 * servlet type in the imports, so that the rewrite stays a rewrite of imports.
 *
 * <ul>
 *   <li>{@code GET|POST /drainctl/down} (init-params {@code downPath}, {@code downQuery}; e.g.
 *       {@code /ok.htm} + {@code down=true} keeps the incident's contract): 200 "down",
 *       idempotent, loopback callers only unless {@code allowRemoteDown=true}.
 *   <li>After down, every HTTP/1.x response carries {@code Connection: close} (RFC 9112 section
 *       9.6); servlet containers close the connection after such a response (Tomcat 10 and
 *       Jetty 9: checked by drainctl's tests), so keep-alive clients leave the pod by themselves.
 *       This is what Jetty itself added on shutdown after users hit the 503 loop (jetty#2749,
 *       #2772).
 *   <li>{@code healthPaths} (comma list, default {@code /healthz}) answer 200 "ok" whether
 *       draining or not: a 503 there, seen through a shared LB address, took the whole LB out of
 *       the gateway's rotation (the incident).
 *   <li>{@code readinessPath} (optional) answers 503 "draining" after down, for the kubelet's
 *       readiness probe only.
 * </ul>
 *
 * <p>The header is decided at the last moment the response's headers can still change, so that
 * a request that was running when down came, even one that had already taken its writer, makes
 * its client leave too: when the response is about to be committed (every write, flush and close
 * of the wrapped writer or stream, {@code flushBuffer}, {@code sendError}, {@code sendRedirect})
 * and after the chain returns if the response is still uncommitted. A response committed before
 * down (a streamed one that flushed early) cannot carry it: its connection closes after the next
 * response on it.
 *
 * <p>Map it first, on {@code /*}: in {@code web.xml}, with {@code @WebFilter} on a subclass, or
 * {@code ServletContext.addFilter} (what Spring Boot's {@code FilterRegistrationBean} does);
 * docs/app-side.md shows all three.
 */
public class DrainFilter implements Filter {
    /** Per JVM (per class loader): a servlet container is one process with many threads. */
    private static final AtomicBoolean DOWN = new AtomicBoolean();

    private String downPath = "/drainctl/down";
    private String downQuery = null;
    private Set<String> healthPaths = new HashSet<>(Arrays.asList("/healthz"));
    private String readinessPath = null;
    private boolean allowRemoteDown = false;

    public static boolean isDraining() {
        return DOWN.get();
    }

    /** What the down endpoint does, for code that learns of the shutdown another way. */
    public static void markDown() {
        DOWN.set(true);
    }

    @Override
    public void init(FilterConfig config) {
        downPath = param(config, "downPath", downPath);
        downQuery = param(config, "downQuery", downQuery);
        String health = param(config, "healthPaths", null);
        if (health != null) {
            healthPaths = new HashSet<>();
            for (String path : health.split(",")) {
                if (!path.trim().isEmpty()) {
                    healthPaths.add(path.trim());
                }
            }
        }
        readinessPath = param(config, "readinessPath", readinessPath);
        allowRemoteDown = Boolean.parseBoolean(param(config, "allowRemoteDown", "false"));
    }

    private static String param(FilterConfig config, String name, String fallback) {
        String value = config == null ? null : config.getInitParameter(name);
        return value == null || value.isEmpty() ? fallback : value;
    }

    @Override
    public void doFilter(ServletRequest request, ServletResponse response, FilterChain chain)
            throws IOException, ServletException {
        if (!(request instanceof HttpServletRequest) || !(response instanceof HttpServletResponse)) {
            chain.doFilter(request, response);
            return;
        }
        HttpServletRequest req = (HttpServletRequest) request;
        HttpServletResponse resp = (HttpServletResponse) response;
        String path = req.getRequestURI().substring(req.getContextPath().length());
        String method = req.getMethod();
        boolean http1 = req.getProtocol().startsWith("HTTP/1.");

        if (path.equals(downPath) && hasParam(req.getQueryString(), downQuery)) {
            if (!method.equals("GET") && !method.equals("POST")) {
                resp.setHeader("Allow", "GET, POST");
                reply(resp, http1, 405, "use GET or POST\n", false);
            } else if (!allowRemoteDown && !isLoopback(req.getRemoteAddr())) {
                reply(resp, http1, 403, "the down endpoint answers loopback only\n", false);
            } else {
                if (!DOWN.getAndSet(true)) {
                    req.getServletContext().log("drainctl: down requested; every response now carries Connection: close");
                }
                reply(resp, http1, 200, "down\n", false);
            }
            return;
        }
        if (path.equals(readinessPath) || healthPaths.contains(path)) {
            boolean head = method.equals("HEAD");
            if (!head && !method.equals("GET")) {
                resp.setHeader("Allow", "GET, HEAD");
                reply(resp, http1, 405, "use GET or HEAD\n", false);
            } else if (path.equals(readinessPath)) {
                boolean down = isDraining();
                reply(resp, http1, down ? 503 : 200, down ? "draining\n" : "ready\n", head);
            } else {
                reply(resp, http1, 200, "ok\n", head);
            }
            return;
        }
        if (!http1) {
            // HTTP/2 has no Connection header (RFC 9113 section 8.2.2): that close is the
            // container's GOAWAY.
            chain.doFilter(request, response);
            return;
        }
        // A request that was running when down came must make its client leave too, even if it
        // took its writer before down: the wrapper decides whenever the response may commit,
        // and once more after the chain, where the container commits what is left.
        CloseWhenDraining wrapped = new CloseWhenDraining(resp);
        wrapped.mark();
        try {
            chain.doFilter(request, wrapped);
        } finally {
            // An async request (startAsync) is committed later, by its writes (the wrapped
            // writer or stream decides then) or by AsyncContext.complete().
            wrapped.mark();
        }
    }

    private static void reply(HttpServletResponse resp, boolean http1, int status, String body, boolean head)
            throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        resp.setStatus(status);
        resp.setContentType("text/plain; charset=utf-8");
        resp.setHeader("Cache-Control", "no-store");
        if (http1 && isDraining()) {
            resp.setHeader("Connection", "close");
        }
        resp.setContentLength(bytes.length);
        if (!head) {
            resp.getOutputStream().write(bytes);
        }
    }

    static boolean hasParam(String rawQuery, String wanted) {
        if (wanted == null || wanted.isEmpty()) {
            return true;
        }
        return rawQuery != null && Arrays.asList(rawQuery.split("&")).contains(wanted);
    }

    static boolean isLoopback(String address) {
        if (address == null || address.isEmpty()) {
            return true; // a unix socket
        }
        try {
            // A literal address: no DNS lookup happens for it.
            return InetAddress.getByName(address).isLoopbackAddress();
        } catch (UnknownHostException e) {
            return false;
        }
    }

    /**
     * Sets Connection: close at the last moment the headers can still change: before anything
     * that may commit the response (a write, flush or close of its writer or stream, which the
     * container commits when its buffer fills; flushBuffer; sendError; sendRedirect), and when
     * the chain returns.
     */
    static final class CloseWhenDraining extends HttpServletResponseWrapper {
        private boolean marked;
        private ServletOutputStream stream;
        private PrintWriter writer;

        CloseWhenDraining(HttpServletResponse response) {
            super(response);
        }

        /** Cheap while not draining (one volatile read); sets the header once when it is. */
        void mark() {
            if (!marked && isDraining() && !isCommitted()) {
                setHeader("Connection", "close");
                marked = true;
            }
        }

        @Override
        public ServletOutputStream getOutputStream() throws IOException {
            mark();
            if (stream == null) {
                stream = new MarkingStream(super.getOutputStream(), this);
            }
            return stream;
        }

        @Override
        public PrintWriter getWriter() throws IOException {
            mark();
            if (writer == null) {
                writer = new MarkingWriter(super.getWriter(), this);
            }
            return writer;
        }

        @Override
        public void flushBuffer() throws IOException {
            mark();
            super.flushBuffer();
        }

        @Override
        public void sendError(int sc, String msg) throws IOException {
            mark();
            super.sendError(sc, msg);
        }

        @Override
        public void sendError(int sc) throws IOException {
            mark();
            super.sendError(sc);
        }

        @Override
        public void sendRedirect(String location) throws IOException {
            mark();
            super.sendRedirect(location);
        }

        @Override
        public void reset() {
            super.reset(); // clears the headers, ours included
            marked = false;
            mark();
        }
    }

    /** The response's stream; the response is marked before every call that may commit it. */
    static final class MarkingStream extends ServletOutputStream {
        private final ServletOutputStream inner;
        private final CloseWhenDraining owner;

        MarkingStream(ServletOutputStream inner, CloseWhenDraining owner) {
            this.inner = inner;
            this.owner = owner;
        }

        @Override
        public void write(int b) throws IOException {
            owner.mark();
            inner.write(b);
        }

        @Override
        public void write(byte[] b, int off, int len) throws IOException {
            owner.mark();
            inner.write(b, off, len);
        }

        @Override
        public void flush() throws IOException {
            owner.mark();
            inner.flush();
        }

        @Override
        public void close() throws IOException {
            owner.mark();
            inner.close();
        }

        @Override
        public boolean isReady() {
            return inner.isReady();
        }

        @Override
        public void setWriteListener(WriteListener listener) {
            inner.setWriteListener(listener);
        }
    }

    /**
     * The response's writer, likewise. Every PrintWriter method ends in one of these (print and
     * format in write; println's line separator, which PrintWriter writes to the inner writer
     * directly, in println()).
     */
    static final class MarkingWriter extends PrintWriter {
        private final PrintWriter inner;
        private final CloseWhenDraining owner;

        MarkingWriter(PrintWriter inner, CloseWhenDraining owner) {
            super(inner);
            this.inner = inner;
            this.owner = owner;
        }

        @Override
        public void write(int c) {
            owner.mark();
            super.write(c);
        }

        @Override
        public void write(char[] buf, int off, int len) {
            owner.mark();
            super.write(buf, off, len);
        }

        @Override
        public void write(String s, int off, int len) {
            owner.mark();
            super.write(s, off, len);
        }

        @Override
        public void println() {
            owner.mark();
            super.println();
        }

        @Override
        public void flush() {
            owner.mark();
            super.flush();
        }

        @Override
        public void close() {
            owner.mark();
            super.close();
        }

        @Override
        public boolean checkError() {
            // The container's writer keeps its own error state (it never throws).
            owner.mark();
            return inner.checkError();
        }
    }

    @Override
    public void destroy() {}
}
