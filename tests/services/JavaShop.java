/*
 * A Java thread-pool order service for sonde's whole-trace tests: JDK only, no tracing
 * code.
 *
 *     java -cp DIR JavaShop DOWNSTREAM_PREFIX CLIENT [async|handoff]
 *
 * Listens on 127.0.0.1:0 (com.sun.net.httpserver with a fixed pool of 8 threads: the
 * thread that reads a request is the one that handles it) and prints "PORT n".
 * With `async`, the handler returns at once and hands the order to a task on the
 * same pool, which answers it from whichever thread runs it (an asynchronous
 * handler: a pool thread may then make the call of an order another thread read,
 * by chance). With `handoff`, that happens to each of the first 8 orders: the thread
 * that read the i-th serves the (i+1)-th (mod 8), and none is answered before all 8
 * calls were made, so that every call is made while the order its thread read is in
 * flight.
 * GET /orders/{id}: the first 8 requests wait for each other (at most 5 s), so that
 * all 8 are in flight together when their calls are made; later ones do not wait. Then
 * GET DOWNSTREAM_PREFIX{id} with CLIENT (e.g.
 * http://127.0.0.1:8081/orders/, or a prefix that does not say the id is an order's),
 * and answers 200 {"order_id": id, "status": "accepted"} (502 when the downstream did
 * not answer 200).
 *
 * CLIENT:
 *   urlconnection  java.net.HttpURLConnection: writes the request on the calling
 *                  thread (blocking socket, keep-alive cache shared by the threads);
 *   httpclient     java.net.http.HttpClient (HTTP/1.1), one for the service, called
 *                  with the blocking send(): its requests are written by its own
 *                  HttpClient-N-Worker threads, not by the calling thread.
 */
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.URL;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

public class JavaShop {
    private static final Pattern ORDER = Pattern.compile("^/orders/([A-Za-z0-9_-]+)$");
    private static final int THREADS = 8;
    private static final CountDownLatch ALL_IN = new CountDownLatch(THREADS);
    private static final ExecutorService POOL = Executors.newFixedThreadPool(THREADS);
    private static String prefix;
    private static String client;
    private static String mode = "";
    private static final HttpExchange[] FIRST = new HttpExchange[THREADS];
    private static final AtomicInteger ARRIVED = new AtomicInteger();
    private static final CountDownLatch ALL_CALLED = new CountDownLatch(THREADS);
    private static final HttpClient HTTP_CLIENT = HttpClient.newBuilder()
            .version(HttpClient.Version.HTTP_1_1)
            .connectTimeout(Duration.ofSeconds(10))
            .build();

    public static void main(String[] args) throws IOException {
        if (args.length < 2 || args.length > 3 || !(args[1].equals("urlconnection") || args[1].equals("httpclient"))
                || (args.length == 3 && !(args[2].equals("async") || args[2].equals("handoff")))) {
            System.err.println("usage: JavaShop DOWNSTREAM_PREFIX urlconnection|httpclient [async|handoff]");
            System.exit(2);
        }
        prefix = args[0];
        client = args[1];
        mode = args.length == 3 ? args[2] : "";
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", 0), 64);
        server.createContext("/", JavaShop::handle);
        server.setExecutor(POOL);
        server.start();
        System.out.println("PORT " + server.getAddress().getPort());
        System.out.flush();
    }

    private static void handle(HttpExchange ex) throws IOException {
        int i = ARRIVED.getAndIncrement();
        if (mode.equals("handoff") && i < THREADS) {
            FIRST[i] = ex;
            ALL_IN.countDown();
            try {
                ALL_IN.await(5, TimeUnit.SECONDS);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
            HttpExchange next = FIRST[(i + 1) % THREADS];
            serve(next != null ? next : ex, true);
            return;
        }
        ALL_IN.countDown();
        if (mode.equals("async")) {
            POOL.execute(() -> serve(ex, false));
        } else {
            serve(ex, false);
        }
    }

    /** Serves one order; `handedOff`: answers only once all 8 handed-off calls were made. */
    private static void serve(HttpExchange ex, boolean handedOff) {
        try {
            Matcher m = ORDER.matcher(ex.getRequestURI().getPath());
            if (!ex.getRequestMethod().equals("GET") || !m.matches()) {
                answer(ex, 404, "{\"error\": \"not found\"}");
                return;
            }
            String id = m.group(1);
            ALL_IN.await(5, TimeUnit.SECONDS);
            int status = client.equals("urlconnection") ? viaUrlConnection(id) : viaHttpClient(id);
            if (handedOff) {
                ALL_CALLED.countDown();
                ALL_CALLED.await(5, TimeUnit.SECONDS);
            }
            if (status != 200) {
                answer(ex, 502, "{\"order_id\": \"" + id + "\", \"error\": \"downstream " + status + "\"}");
                return;
            }
            answer(ex, 200, "{\"order_id\": \"" + id + "\", \"status\": \"accepted\"}");
        } catch (Exception e) {
            e.printStackTrace();
            try {
                answer(ex, 500, "{\"error\": \"" + e.getClass().getSimpleName() + "\"}");
            } catch (IOException ignored) {
                // the client is gone
            }
        } finally {
            ex.close();
        }
    }

    private static int viaUrlConnection(String id) throws IOException {
        HttpURLConnection c = (HttpURLConnection) new URL(prefix + id).openConnection();
        c.setConnectTimeout(10000);
        c.setReadTimeout(10000);
        c.setRequestProperty("Accept", "application/json");
        int status = c.getResponseCode();
        try (InputStream in = status < 400 ? c.getInputStream() : c.getErrorStream()) {
            if (in != null) {
                in.readAllBytes(); // read to the end: the connection goes back to the keep-alive cache
            }
        }
        return status;
    }

    private static int viaHttpClient(String id) throws IOException, InterruptedException {
        HttpRequest req = HttpRequest.newBuilder(URI.create(prefix + id))
                .header("Accept", "application/json")
                .timeout(Duration.ofSeconds(10))
                .GET()
                .build();
        return HTTP_CLIENT.send(req, HttpResponse.BodyHandlers.ofString()).statusCode();
    }

    private static void answer(HttpExchange ex, int status, String json) throws IOException {
        byte[] body = json.getBytes(StandardCharsets.UTF_8);
        ex.getResponseHeaders().set("Content-Type", "application/json");
        ex.sendResponseHeaders(status, body.length);
        try (OutputStream os = ex.getResponseBody()) {
            os.write(body);
        }
    }
}
