package io.drainctl.tomcat;

import io.drainctl.DrainFilter;
import io.drainctl.demo.DemoServlet;
import jakarta.servlet.DispatcherType;
import jakarta.servlet.FilterRegistration;
import jakarta.servlet.ServletContainerInitializer;
import jakarta.servlet.ServletContext;
import jakarta.servlet.ServletRegistration;
import java.io.File;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Comparator;
import java.util.EnumSet;
import java.util.Set;
import java.util.stream.Stream;
import org.apache.catalina.Context;
import org.apache.catalina.LifecycleException;
import org.apache.catalina.connector.Connector;
import org.apache.catalina.startup.Tomcat;

/**
 * DrainFilter ({@code dist/drainctl-servlet-jakarta.jar}) in embedded Tomcat 10 (Debian's
 * libtomcat10-embed-java), so that drainctl's tests see what Tomcat itself does with the
 * filter's {@code Connection: close}. tests/test_app_side_java.py also runs it with its imports
 * rewritten to javax (as build/java.py does for the filter) in Tomcat 9.0 (libtomcat9-java) with
 * {@code dist/drainctl-servlet-javax.jar}: the embedding API is the same.
 *
 * <p>Run: {@code java -cp CLASSES:drainctl-servlet-jakarta.jar:TOMCAT_JARS
 * io.drainctl.tomcat.TomcatDemo PORT [ADDRESS [WEBAPP]]}; prints "ready PORT" once it listens.
 * Without WEBAPP the filter and {@link DemoServlet} are registered in code, with
 * {@code ServletContext.addFilter}, as Spring Boot's {@code FilterRegistrationBean} does; with
 * WEBAPP (a directory with {@code WEB-INF/web.xml}, {@code WEB-INF/lib},
 * {@code WEB-INF/classes}) Tomcat deploys it as a web application, so registration by
 * {@code web.xml} or by {@code @WebFilter} scanning is Tomcat's own.
 * {@code -Ddrainctl.downPath=/ok.htm -Ddrainctl.downQuery=down=true}: the incident's down URL;
 * {@code -Ddrainctl.filter=off}: no filter at all, an app that was never changed.
 */
public final class TomcatDemo {
    private TomcatDemo() {}

    /** The registration in code: what a FilterRegistrationBean does at start-up. */
    public static final class Register implements ServletContainerInitializer {
        @Override
        public void onStartup(Set<Class<?>> classes, ServletContext ctx) {
            ServletRegistration.Dynamic app = ctx.addServlet("demo", DemoServlet.class);
            app.addMapping("/");
            // -Ddrainctl.filter=off: an app that was never changed (drainctl run --close-idle).
            if ("off".equals(System.getProperty("drainctl.filter"))) {
                return;
            }
            FilterRegistration.Dynamic drain = ctx.addFilter("drainctl", DrainFilter.class);
            drain.setInitParameter("healthPaths", "/healthz,/ok.htm");
            drain.setInitParameter("readinessPath", "/readyz");
            String downPath = System.getProperty("drainctl.downPath");
            if (downPath != null) {
                drain.setInitParameter("downPath", downPath);
                drain.setInitParameter("downQuery", System.getProperty("drainctl.downQuery", ""));
            }
            // isMatchAfter false: before every filter the app declares, like HIGHEST_PRECEDENCE.
            drain.addMappingForUrlPatterns(EnumSet.of(DispatcherType.REQUEST), false, "/*");
        }
    }

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        String address = args.length > 1 ? args[1] : "127.0.0.1";
        String webapp = args.length > 2 ? args[2] : null;

        // Tomcat's work directory: a fresh one, removed at exit (not ./tomcat.PORT).
        Path base = Files.createTempDirectory("drainctl-tomcat-");
        Tomcat tomcat = new Tomcat();
        tomcat.setBaseDir(base.toString());
        Connector connector = new Connector(); // HTTP/1.1, NIO: Tomcat's and Spring Boot's default
        connector.setPort(port);
        connector.setProperty("address", address);
        tomcat.setConnector(connector);

        Context ctx;
        if (webapp == null) {
            ctx = tomcat.addContext("", base.toString());
            ctx.addServletContainerInitializer(new Register(), null);
        } else {
            tomcat.setAddDefaultWebXmlToWebapp(false); // no default or JSP servlet: not needed
            ctx = tomcat.addWebapp("", new File(webapp).getAbsolutePath());
        }
        // As Spring Boot does: the JVM's shutdown (SIGTERM) stops Tomcat.
        Runtime.getRuntime().addShutdownHook(new Thread(() -> stop(tomcat, base)));
        tomcat.start();
        if (!ctx.getState().isAvailable()) {
            System.err.println("TomcatDemo: the web application did not start");
            System.exit(1);
        }
        System.out.println("ready " + connector.getLocalPort());
        System.out.flush();
        tomcat.getServer().await();
    }

    private static void stop(Tomcat tomcat, Path base) {
        try {
            tomcat.stop();
            tomcat.destroy();
        } catch (LifecycleException e) {
            System.err.println("TomcatDemo: stop: " + e);
        }
        try (Stream<Path> tree = Files.walk(base)) {
            tree.sorted(Comparator.reverseOrder()).map(Path::toFile).forEach(File::delete);
        } catch (IOException e) {
            System.err.println("TomcatDemo: " + base + ": " + e);
        }
    }
}
