'use strict';
// Loaded into s3rver with `node --require` by tests/kafka_broker.py.  S3's PutObject is
// atomic: an object exists whole once its upload completed, and an upload cut off leaves
// the previous version or nothing.  s3rver 3.7 writes an object's file in place as its
// bytes arrive, so a broker killed in the middle of an upload left a truncated object
// (an empty state file, a short batch) that the restarted broker could not read.  Here
// an upload goes to a file of its own, which replaces the object only once every byte
// the request announced has arrived.
const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const { Transform, pipeline } = require('stream');

const FilesystemStore = require(process.env.OWCA_S3RVER_STORE);
let uploads = 0;

FilesystemStore.prototype.putObject = async function putObjectAtomically(object) {
  const target = this.getResourcePath(object.bucket, object.key, 'object');
  const upload = `${target}.upload-${++uploads}`;
  await fs.promises.mkdir(path.dirname(target), { recursive: true });
  const md5 = crypto.createHash('md5');
  let size = 0;
  try {
    if (Buffer.isBuffer(object.content)) {
      await fs.promises.writeFile(upload, object.content);
      md5.update(object.content);
      size = object.content.length;
    } else {
      const counted = new Transform({
        transform(chunk, encoding, done) {
          md5.update(chunk);
          size += chunk.length;
          done(null, chunk);
        },
      });
      await new Promise((resolve, reject) => pipeline(
        object.content, counted, fs.createWriteStream(upload),
        (err) => (err ? reject(err) : resolve())));
    }
    const announced = Number(object.metadata['content-length']);
    if (Number.isFinite(announced) && size !== announced) {
      throw new Error(`upload of ${object.key} cut off: ${size} of ${announced} bytes`);
    }
    await fs.promises.rename(upload, target);
  } catch (err) {
    await fs.promises.rm(upload, { force: true });
    throw err;
  }
  const digest = md5.digest('hex');
  await this.putMetadata(object.bucket, object.key, object.metadata, digest);
  return { size, md5: digest };
};
