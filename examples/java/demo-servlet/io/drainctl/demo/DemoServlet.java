package io.drainctl.demo;

import io.drainctl.DrainFilter;
import jakarta.servlet.annotation.WebServlet;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;
import java.io.OutputStream;
import java.io.PrintWriter;
import java.nio.charset.StandardCharsets;

/**
 * The demo app behind DrainFilter, in Tomcat (examples/java/tomcat) and Jetty (examples/java/jetty,
 * with the imports rewritten to javax as build/java.py does for the filter): says whether it is
 * draining ({@code X-Draining}), which process, thread and pod answered ({@code X-Pid},
 * {@code X-Thread}, {@code X-Pod} from {@code -Ddrainctl.pod}) and whether it was draining when
 * the request came in ({@code X-Draining-At-Start}).
 *
 * <p>{@code /slow?s=N} (at most 10 s) answers after N seconds, and takes its writer
 * <em>before</em> it waits, as a servlet that streams a result does: a down call during the
 * wait must still close its connection. {@code take=late} takes the writer after the wait,
 * {@code take=stream} takes the output stream before it.
 */
@WebServlet(name = "demo", urlPatterns = "/") // found when a web application is scanned
public class DemoServlet extends HttpServlet {
    private static final long serialVersionUID = 1L;
    private static final double SLOW_MAX = 10.0;

    @Override
    protected void doGet(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        String path = req.getRequestURI().substring(req.getContextPath().length());
        String query = req.getQueryString();
        resp.setContentType("text/plain; charset=utf-8");
        resp.setHeader("X-Pid", Long.toString(ProcessHandle.current().pid()));
        resp.setHeader("X-Pod", System.getProperty("drainctl.pod", "-"));
        resp.setHeader("X-Thread", Thread.currentThread().getName());
        resp.setHeader("X-Draining-At-Start", draining());
        if (!path.equals("/slow")) {
            answer(resp, resp.getWriter(), null, "hello draining=" + draining() + "\n");
            return;
        }
        String take = param(query, "take", "writer");
        PrintWriter writer = take.equals("writer") ? resp.getWriter() : null;
        OutputStream stream = take.equals("stream") ? resp.getOutputStream() : null;
        sleep(Math.min(Math.max(Double.parseDouble(param(query, "s", "1")), 0.0), SLOW_MAX));
        if (writer == null && stream == null) {
            writer = resp.getWriter();
        }
        answer(resp, writer, stream, "slow\n");
    }

    private static void answer(HttpServletResponse resp, PrintWriter writer, OutputStream stream,
            String body) throws IOException {
        resp.setHeader("X-Draining", draining());
        if (stream != null) {
            stream.write(body.getBytes(StandardCharsets.UTF_8));
        } else {
            writer.write(body);
        }
    }

    private static String draining() {
        return DrainFilter.isDraining() ? "1" : "0";
    }

    private static String param(String rawQuery, String name, String fallback) {
        if (rawQuery != null) {
            for (String pair : rawQuery.split("&")) {
                if (pair.startsWith(name + "=")) {
                    return pair.substring(name.length() + 1);
                }
            }
        }
        return fallback;
    }

    private static void sleep(double seconds) {
        try {
            Thread.sleep((long) (seconds * 1000));
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }
}
