package io.drainctl.jetty;

import io.drainctl.DrainFilter;
import io.drainctl.demo.DemoServlet;
import java.util.EnumSet;
import javax.servlet.DispatcherType;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jetty.servlet.FilterHolder;
import org.eclipse.jetty.servlet.ServletContextHandler;
import org.eclipse.jetty.servlet.ServletHolder;

/**
 * DrainFilter in a real servlet container (embedded Jetty 9.4, Debian's libjetty9-java), so
 * drainctl's tests can check that the container really closes connections after down.
 *
 * <p>Run: {@code java -cp out:drainctl-servlet-javax.jar:$JETTY_JARS io.drainctl.jetty.JettyDemo
 * 8080}; prints "ready PORT". {@code out} holds this class and examples/java/demo-servlet
 * rewritten to javax (tests/test_app_side_java.py does both).
 */
public final class JettyDemo {
    private JettyDemo() {}

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
        context.addServlet(new ServletHolder(new DemoServlet()), "/*");
        server.setHandler(context);
        server.start();
        System.out.println("ready " + connector.getLocalPort());
        System.out.flush();
        server.join();
    }
}
