package io.drainctl.demo;

import com.sun.net.httpserver.Filter;
import com.sun.net.httpserver.Headers;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.Set;
import java.util.concurrent.Executors;
import java.util.concurrent.atomic.AtomicBoolean;

/**
 * drainctl's app-side contract with nothing but the JDK ({@code com.sun.net.httpserver}).
 *
 * <ul>
 *   <li>{@code GET|POST /drainctl/down} (or {@code -Ddrainctl.downPath=/ok.htm
 *       -Ddrainctl.downQuery=down=true} for the incident's contract): 200 "down", idempotent,
 *       loopback callers only.
 *   <li>After down, every response carries {@code Connection: close} (RFC 9112 section 9.6) and
 *       the JDK server closes the connection after it, so keep-alive clients leave by themselves.
 *   <li>Health paths ({@code /healthz}, {@code /ok.htm}) answer 200 "ok" whether draining or not:
 *       the incident's 503, seen through a shared LB address, took the whole LB out of rotation.
 *   <li>{@code /readyz} answers 503 "draining" after down, for the kubelet's readiness probe only.
 * </ul>
 *
 * <p>Run: {@code javac -d out $(find examples/java/httpserver -name '*.java') && java -cp out
 * io.drainctl.demo.DrainDemo 8080}. Prints "ready PORT" once it listens.
 */
public final class DrainDemo {
    /** One JVM is one process: a static flag reaches every request thread. */
    private static final AtomicBoolean DOWN = new AtomicBoolean();

    private DrainDemo() {}

    public static boolean isDraining() {
        return DOWN.get();
    }

    public static void markDown() {
        if (!DOWN.getAndSet(true)) {
            System.err.println("drainctl: down requested; every response now carries Connection: close");
        }
    }

    /** The contract as a com.sun.net.httpserver Filter, in front of any handler. */
    public static final class DrainFilter extends Filter {
        private final String downPath;
        private final String downQuery; // e.g. "down=true"; null: the path alone
        private final Set<String> healthPaths;
        private final String readinessPath;

        public DrainFilter(String downPath, String downQuery, Set<String> healthPaths, String readinessPath) {
            this.downPath = downPath;
            this.downQuery = downQuery;
            this.healthPaths = healthPaths;
            this.readinessPath = readinessPath;
        }

        @Override
        public String description() {
            return "drainctl: down endpoint, Connection: close after down, health stays 200";
        }

        @Override
        public void doFilter(HttpExchange exchange, Chain chain) throws IOException {
            String path = exchange.getRequestURI().getPath();
            String query = exchange.getRequestURI().getRawQuery();
            String method = exchange.getRequestMethod();
            if (path.equals(downPath) && hasParam(query, downQuery)) {
                if (!method.equals("GET") && !method.equals("POST")) {
                    exchange.getResponseHeaders().set("Allow", "GET, POST");
                    reply(exchange, 405, "use GET or POST\n");
                } else if (!isLoopback(exchange.getRemoteAddress().getAddress())) {
                    reply(exchange, 403, "the down endpoint answers loopback only\n");
                } else {
                    markDown();
                    reply(exchange, 200, "down\n");
                }
            } else if (path.equals(readinessPath)) {
                reply(exchange, isDraining() ? 503 : 200, isDraining() ? "draining\n" : "ready\n");
            } else if (healthPaths.contains(path)) {
                reply(exchange, 200, "ok\n");
            } else {
                // Set before the handler runs, and again when it sends its headers: a request
                // that was already running when down came must make its client leave too.
                closeIfDraining(exchange);
                chain.doFilter(new CloseOnSend(exchange));
            }
        }

        private static void reply(HttpExchange exchange, int status, String body) throws IOException {
            byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
            Headers headers = exchange.getResponseHeaders();
            headers.set("Content-Type", "text/plain; charset=utf-8");
            headers.set("Cache-Control", "no-store");
            closeIfDraining(exchange);
            boolean head = exchange.getRequestMethod().equals("HEAD");
            exchange.sendResponseHeaders(status, head ? -1 : bytes.length);
            try (OutputStream out = exchange.getResponseBody()) {
                if (!head) {
                    out.write(bytes);
                }
            }
        }

        private static void closeIfDraining(HttpExchange exchange) {
            // The JDK's server closes the connection after a response whose Connection header
            // says close (sun.net.httpserver.ExchangeImpl.sendResponseHeaders: "Connection: close
            // requested by handler"; checked on JDK 17 by tests/test_app_side_java.py).
            if (isDraining() && exchange.getProtocol().startsWith("HTTP/1.")) {
                exchange.getResponseHeaders().set("Connection", "close");
            }
        }

        /** The handler's exchange, with Connection: close added when it sends its headers. */
        static final class CloseOnSend extends HttpExchange {
            private final HttpExchange inner;

            CloseOnSend(HttpExchange inner) {
                this.inner = inner;
            }

            @Override
            public void sendResponseHeaders(int rCode, long responseLength) throws IOException {
                closeIfDraining(inner);
                inner.sendResponseHeaders(rCode, responseLength);
            }

            @Override public Headers getRequestHeaders() { return inner.getRequestHeaders(); }
            @Override public Headers getResponseHeaders() { return inner.getResponseHeaders(); }
            @Override public java.net.URI getRequestURI() { return inner.getRequestURI(); }
            @Override public String getRequestMethod() { return inner.getRequestMethod(); }
            @Override public com.sun.net.httpserver.HttpContext getHttpContext() { return inner.getHttpContext(); }
            @Override public void close() { inner.close(); }
            @Override public java.io.InputStream getRequestBody() { return inner.getRequestBody(); }
            @Override public OutputStream getResponseBody() { return inner.getResponseBody(); }
            @Override public InetSocketAddress getRemoteAddress() { return inner.getRemoteAddress(); }
            @Override public int getResponseCode() { return inner.getResponseCode(); }
            @Override public InetSocketAddress getLocalAddress() { return inner.getLocalAddress(); }
            @Override public String getProtocol() { return inner.getProtocol(); }
            @Override public Object getAttribute(String name) { return inner.getAttribute(name); }
            @Override public void setAttribute(String name, Object value) { inner.setAttribute(name, value); }
            @Override public void setStreams(java.io.InputStream i, OutputStream o) { inner.setStreams(i, o); }
            @Override public com.sun.net.httpserver.HttpPrincipal getPrincipal() { return inner.getPrincipal(); }
        }

        static boolean hasParam(String rawQuery, String wanted) {
            if (wanted == null || wanted.isEmpty()) {
                return true;
            }
            return rawQuery != null && Arrays.asList(rawQuery.split("&")).contains(wanted);
        }

        static boolean isLoopback(InetAddress address) {
            return address == null || address.isLoopbackAddress();
        }
    }

    public static void main(String[] args) throws IOException {
        int port = args.length > 0 ? Integer.parseInt(args[0]) : 8080;
        HttpServer server = HttpServer.create(new InetSocketAddress(InetAddress.getLoopbackAddress(), port), 64);
        DrainFilter drain = new DrainFilter(
                System.getProperty("drainctl.downPath", "/drainctl/down"),
                System.getProperty("drainctl.downQuery"),
                Set.of("/healthz", "/ok.htm"),
                "/readyz");
        server.createContext("/", exchange -> {
            String body = "hello draining=" + (isDraining() ? 1 : 0) + "\n";
            byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
            exchange.getResponseHeaders().set("Content-Type", "text/plain");
            exchange.getResponseHeaders().set("X-Draining", isDraining() ? "1" : "0");
            exchange.getResponseHeaders().set("X-Pid", Long.toString(ProcessHandle.current().pid()));
            exchange.sendResponseHeaders(200, bytes.length);
            try (OutputStream out = exchange.getResponseBody()) {
                out.write(bytes);
            }
        }).getFilters().add(drain);
        server.setExecutor(Executors.newFixedThreadPool(4));
        server.start();
        System.out.println("ready " + server.getAddress().getPort());
        System.out.flush();
    }
}
