package io.drainctl.example;

import io.drainctl.DrainFilter;
import jakarta.servlet.annotation.WebFilter;
import jakarta.servlet.annotation.WebInitParam;

/**
 * DrainFilter registered by annotation scanning: a subclass in the application's own classes
 * (WEB-INF/classes), with drainctl-servlet-jakarta.jar in WEB-INF/lib. The container finds it
 * when the web.xml is absent or not {@code metadata-complete}. Annotations give filters no order:
 * if another filter must run after this one, map them in web.xml instead.
 *
 * <p>drainctl's down URL for this one: {@code --down-url http://127.0.0.1:8080/ok.htm?down=true}.
 * tests/test_app_side_java.py deploys it in embedded Tomcat 10.
 */
@WebFilter(
        filterName = "drainctl",
        urlPatterns = "/*",
        initParams = {
            @WebInitParam(name = "downPath", value = "/ok.htm"),
            @WebInitParam(name = "downQuery", value = "down=true"),
            @WebInitParam(name = "healthPaths", value = "/healthz,/ok.htm"),
            @WebInitParam(name = "readinessPath", value = "/readyz"),
        })
public class AppDrainFilter extends DrainFilter {}
