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
import javax.servlet.Filter;
import javax.servlet.FilterChain;
import javax.servlet.FilterConfig;
import javax.servlet.ServletException;
import javax.servlet.ServletOutputStream;
import javax.servlet.ServletRequest;
import javax.servlet.ServletResponse;
import javax.servlet.http.HttpServletRequest;
import javax.servlet.http.HttpServletResponse;
import javax.servlet.http.HttpServletResponseWrapper;

/**
 * drainctl's app-side contract as a Servlet Filter (Servlet 3.1+: Tomcat 9, Jetty 9/10,
 * Spring Boot 2). For Jakarta EE 9+ (Tomcat 10+, Jetty 11+, Spring Boot 3) replace
 * {@code javax.servlet} with {@code jakarta.servlet}: nothing else changes.
 *
 * <ul>
 *   <li>{@code GET|POST /drainctl/down} (init-params {@code downPath}, {@code downQuery}; e.g.
 *       {@code /ok.htm} + {@code down=true} keeps the incident's contract): 200 "down",
 *       idempotent, loopback callers only unless {@code allowRemoteDown=true}.
 *   <li>After down, every HTTP/1.x response carries {@code Connection: close} (RFC 9112 section
 *       9.6); servlet containers close the connection after such a response (Jetty: checked by
 *       drainctl's tests), so keep-alive clients leave the pod by themselves. This is what
 *       Jetty itself added on shutdown after users hit the 503 loop (jetty#2749, #2772).
 *   <li>{@code healthPaths} (comma list, default {@code /healthz}) answer 200 "ok" whether
 *       draining or not: a 503 there, seen through a shared LB address, took the whole LB out of
 *       the gateway's rotation (the incident).
 *   <li>{@code readinessPath} (optional) answers 503 "draining" after down, for the kubelet's
 *       readiness probe only.
 * </ul>
 *
 * <p>Map it first, on {@code /*}: {@code FilterRegistration.Dynamic f =
 * ctx.addFilter("drainctl", DrainFilter.class); f.addMappingForUrlPatterns(null, false, "/*");}
 * or in Spring Boot a {@code FilterRegistrationBean} with the highest precedence.
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
        if (isDraining()) {
            resp.setHeader("Connection", "close");
        }
        // The wrapper also catches a request that was running when down was called: the
        // header is set when the response is about to be committed, if by then we are down.
        chain.doFilter(request, new CloseWhenDraining(resp));
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

    /** Sets Connection: close at the last moment before the headers can be committed. */
    static final class CloseWhenDraining extends HttpServletResponseWrapper {
        CloseWhenDraining(HttpServletResponse response) {
            super(response);
        }

        private void mark() {
            if (isDraining() && !isCommitted()) {
                setHeader("Connection", "close");
            }
        }

        @Override
        public ServletOutputStream getOutputStream() throws IOException {
            mark();
            return super.getOutputStream();
        }

        @Override
        public PrintWriter getWriter() throws IOException {
            mark();
            return super.getWriter();
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
            super.reset();
            mark();
        }
    }

    @Override
    public void destroy() {}
}
