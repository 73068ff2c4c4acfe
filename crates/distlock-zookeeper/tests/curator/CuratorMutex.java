// A Curator InterProcessMutex driven line by line on stdin, for the
// interoperability tests (tests/curator.rs); built there with javac
// against Debian's libcurator-recipes-java.
//
// Usage: java CuratorMutex <connect string> <lock path>
// Commands, one per line: "acquire" (waits), "try" (no wait), "release",
// "quit". Answers, one line each: "acquired <czxid>" (the creation zxid of
// the holder's lock node: Curator's holder has no token of its own),
// "busy", "released".

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.util.Collection;
import java.util.concurrent.TimeUnit;

import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.framework.recipes.locks.InterProcessMutex;
import org.apache.curator.retry.ExponentialBackoffRetry;

public class CuratorMutex {
    public static void main(String[] args) throws Exception {
        CuratorFramework client = CuratorFrameworkFactory.newClient(
                args[0], 10_000, 5_000, new ExponentialBackoffRetry(100, 3));
        client.start();
        client.blockUntilConnected();
        InterProcessMutex mutex = new InterProcessMutex(client, args[1]);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        String line;
        while ((line = in.readLine()) != null) {
            switch (line.trim()) {
                case "acquire":
                    mutex.acquire();
                    say("acquired " + czxidOfHolder(client, mutex));
                    break;
                case "try":
                    if (mutex.acquire(0, TimeUnit.MILLISECONDS)) {
                        say("acquired " + czxidOfHolder(client, mutex));
                    } else {
                        say("busy");
                    }
                    break;
                case "release":
                    mutex.release();
                    say("released");
                    break;
                case "quit":
                    client.close();
                    return;
                default:
                    say("unknown " + line);
            }
        }
        client.close();
    }

    private static synchronized void say(String line) {
        System.out.println(line);
        System.out.flush();
    }

    // The holder's lock node is the first participant.
    private static long czxidOfHolder(CuratorFramework client, InterProcessMutex mutex)
            throws Exception {
        Collection<String> nodes = mutex.getParticipantNodes();
        String holder = nodes.iterator().next();
        return client.checkExists().forPath(holder).getCzxid();
    }

}
