// What every script here shares: its input is one JSON argument, its answer one JSON line on stdout.
// An error the service answered (a status code, or DPS refusing a registration) is an answer too,
// {"error": {...}}, so a test can check it; anything else is a failure (message on stderr, exit code 1).  Secrets come from the environment.
'use strict';

function input() {
  return process.argv.length > 2 ? JSON.parse(process.argv[2]) : {};
}

function secret(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set`);
  }
  return value;
}

// DPS's refusal of a device's registration, as azure-iot-provisioning-device reports it: an error status on
// the MQTT response topic (`err.transportObject.topic`, the body in `err.result`), or a final operation
// status `failed`/`disabled` (DeviceRegistrationFailedError / SyntaxError, the operation status in
// `err.result`; the topic said 200).
function registrationRefusal(err) {
  if (!err || !err.result || typeof err.result !== 'object') {
    return null;
  }
  const topic = err.transportObject && err.transportObject.topic;
  const match = typeof topic === 'string' && /^\$dps\/registrations\/res\/(\d+)\//.exec(topic);
  const status = match ? Number(match[1]) : 200;
  return { error: { name: err.name, status, message: err.message, result: err.result } };
}

function serviceError(err) {
  const response = err && (err.response || (err.transportError && err.transportError.response));
  if (!response || !response.statusCode) {
    return registrationRefusal(err);
  }
  return { error: { name: err.name, status: response.statusCode, message: err.message } };
}

// Runs `commands[argv[2]](input)` (or `commands.main` when there is only one) and prints its answer.
function run(commands) {
  const names = Object.keys(commands);
  const name = names.length === 1 ? names[0] : process.argv.splice(2, 1)[0];
  const command = commands[name];
  if (!command) {
    process.stderr.write(`unknown command ${name}; one of ${names.join(', ')}\n`);
    process.exit(2);
  }
  command(input())
    .then((answer) => answer, (err) => {
      const answer = serviceError(err);
      if (answer === null) {
        throw err;
      }
      return answer;
    })
    .then((answer) => {
      // The SDKs keep sockets and timers alive after close: leave once the answer is written.
      process.stdout.write(JSON.stringify(answer) + '\n', () => process.exit(0));
    })
    .catch((err) => {
      process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
      process.exit(1);
    });
}

module.exports = { run, secret };
