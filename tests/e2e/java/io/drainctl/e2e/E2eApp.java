package io.drainctl.e2e;

import com.sun.net.httpserver.HttpServer;
import io.drainctl.demo.DrainDemo;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.Set;
import java.util.concurrent.Executors;

/**
 * The Java app of the e2e pods: examples/java's {@link DrainDemo.DrainFilter}, unchanged, in front
 * of a handler with a {@code /slow?s=N} route.
 *
 * <p>Unlike {@code DrainDemo.main}, it listens on every address (the load balancer reaches the pod
 * over its veth, not over loopback) and names its pod in {@code X-Pod}. The down contract is the
 * incident's: {@code /ok.htm?down=true}; {@code /ok.htm} is the health page and stays 200.
 *
 * <p>Run: {@code java -cp out io.drainctl.e2e.E2eApp PORT POD [naive]}; prints "ready PORT" once it
 * listens. {@code naive}: without the filter, an app that was never changed (no down endpoint, never
 * {@code Connection: close}), for drainctl's {@code --close-idle}.
 */
public final class E2eApp {
    private static final double SLOW_MAX = 10.0;

    private E2eApp() {}

    public static void main(String[] args) throws IOException {
        int port = Integer.parseInt(args[0]);
        String pod = args.length > 1 ? args[1] : "?";
        boolean naive = args.length > 2 && args[2].equals("naive");
        HttpServer server = HttpServer.create(new InetSocketAddress(port), 128);
        DrainDemo.DrainFilter drain =
                new DrainDemo.DrainFilter("/ok.htm", "down=true", Set.of("/ok.htm"), "/readyz");
        var context = server.createContext("/", exchange -> {
            String body = "ok\n";
            if (exchange.getRequestURI().getPath().equals("/slow")) {
                sleep(seconds(exchange.getRequestURI().getRawQuery()));
                body = "slow\n";
            }
            byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
            exchange.getResponseHeaders().set("Content-Type", "text/plain");
            exchange.getResponseHeaders().set("X-Pod", pod);
            exchange.sendResponseHeaders(200, bytes.length);
            try (OutputStream out = exchange.getResponseBody()) {
                out.write(bytes);
            }
        });
        if (!naive) {
            context.getFilters().add(drain);
        }
        // Idle keep-alive connections cost no thread in com.sun.net.httpserver; a thread per
        // request in flight is what the slow requests need.
        server.setExecutor(Executors.newCachedThreadPool());
        server.start();
        System.out.println("ready " + server.getAddress().getPort());
        System.out.flush();
    }

    private static double seconds(String rawQuery) {
        if (rawQuery != null) {
            for (String pair : rawQuery.split("&")) {
                if (pair.startsWith("s=")) {
                    return Math.min(Math.max(Double.parseDouble(pair.substring(2)), 0.0), SLOW_MAX);
                }
            }
        }
        return 1.0;
    }

    private static void sleep(double seconds) {
        try {
            Thread.sleep((long) (seconds * 1000));
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }
}
