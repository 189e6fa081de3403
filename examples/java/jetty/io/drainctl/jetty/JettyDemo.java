package io.drainctl.jetty;

import io.drainctl.DrainFilter;
import java.io.IOException;
import java.util.EnumSet;
import javax.servlet.DispatcherType;
import javax.servlet.http.HttpServlet;
import javax.servlet.http.HttpServletRequest;
import javax.servlet.http.HttpServletResponse;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jetty.servlet.FilterHolder;
import org.eclipse.jetty.servlet.ServletContextHandler;
import org.eclipse.jetty.servlet.ServletHolder;

/**
 * DrainFilter in a real servlet container (embedded Jetty 9.4, Debian's libjetty9-java), so
 * drainctl's tests can check that the container really closes connections after down.
 *
 * <p>Run: {@code java -cp out:$JETTY_JARS io.drainctl.jetty.JettyDemo 8080}; prints "ready PORT".
 */
public final class JettyDemo {
    private JettyDemo() {}

    /** The app: says whether it is draining, as the Python test apps do. */
    static final class Hello extends HttpServlet {
        private static final long serialVersionUID = 1L;

        @Override
        protected void doGet(HttpServletRequest req, HttpServletResponse resp) throws IOException {
            byte[] body = ("hello draining=" + (DrainFilter.isDraining() ? 1 : 0) + "\n").getBytes("UTF-8");
            resp.setContentType("text/plain");
            resp.setHeader("X-Draining", DrainFilter.isDraining() ? "1" : "0");
            resp.setHeader("X-Pid", Long.toString(ProcessHandle.current().pid()));
            resp.setContentLength(body.length);
            resp.getOutputStream().write(body);
        }
    }

    public static void main(String[] args) throws Exception {
        int port = args.length > 0 ? Integer.parseInt(args[0]) : 8080;
        Server server = new Server();
        ServerConnector connector = new ServerConnector(server);
        connector.setHost("127.0.0.1");
        connector.setPort(port);
        server.addConnector(connector);

        ServletContextHandler context = new ServletContextHandler();
        context.setContextPath("/");
        FilterHolder drain = context.addFilter(DrainFilter.class, "/*", EnumSet.of(DispatcherType.REQUEST));
        drain.setInitParameter("healthPaths", "/healthz,/ok.htm");
        drain.setInitParameter("readinessPath", "/readyz");
        String downPath = System.getProperty("drainctl.downPath");
        if (downPath != null) {
            drain.setInitParameter("downPath", downPath);
            drain.setInitParameter("downQuery", System.getProperty("drainctl.downQuery", ""));
        }
        context.addServlet(new ServletHolder(new Hello()), "/*");
        server.setHandler(context);
        server.start();
        System.out.println("ready " + connector.getLocalPort());
        System.out.flush();
        server.join();
    }
}
