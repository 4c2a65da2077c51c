/* rawcdb: send one raw CDB through libiscsi (a real initiator) and print what came back.
 *
 *   rawcdb INITIATOR_IQN iscsi://HOST:PORT/TARGET/LUN HEXCDB
 *
 * Prints "status=S" and, for CHECK CONDITION, "sense=KEY/ASC/ASCQ" (hex), one line. Exit 0 when
 * the command completed (whatever its status), 1 when it could not be sent. No data is sent
 * or expected (a non-data command). Used by tests/integration/test_explain.py to send commands
 * Sparrow does not support (sg_raw is not installed).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: rawcdb INITIATOR_IQN URL HEXCDB\n");
        return 2;
    }
    unsigned char cdb[16];
    size_t hexlen = strlen(argv[3]);
    if (hexlen % 2 || hexlen < 12 || hexlen > 32) {
        fprintf(stderr, "the CDB must be 6..16 bytes of hex\n");
        return 2;
    }
    int cdb_size = (int)(hexlen / 2);
    for (int i = 0; i < cdb_size; i++) {
        unsigned int byte;
        if (sscanf(argv[3] + 2 * i, "%2x", &byte) != 1) {
            fprintf(stderr, "bad hex in the CDB\n");
            return 2;
        }
        cdb[i] = (unsigned char)byte;
    }
    struct iscsi_context *iscsi = iscsi_create_context(argv[1]);
    if (iscsi == NULL) {
        fprintf(stderr, "iscsi_create_context failed\n");
        return 1;
    }
    struct iscsi_url *url = iscsi_parse_full_url(iscsi, argv[2]);
    if (url == NULL) {
        fprintf(stderr, "bad url: %s\n", iscsi_get_error(iscsi));
        return 1;
    }
    iscsi_set_session_type(iscsi, ISCSI_SESSION_NORMAL);
    iscsi_set_header_digest(iscsi, ISCSI_HEADER_DIGEST_NONE);
    iscsi_set_targetname(iscsi, url->target);
    if (iscsi_full_connect_sync(iscsi, url->portal, url->lun) != 0) {
        fprintf(stderr, "login failed: %s\n", iscsi_get_error(iscsi));
        return 1;
    }
    struct scsi_task *task = malloc(sizeof(*task));
    if (task == NULL) return 1;
    memset(task, 0, sizeof(*task));
    memcpy(task->cdb, cdb, (size_t)cdb_size);
    task->cdb_size = cdb_size;
    task->xfer_dir = SCSI_XFER_NONE;
    task->expxferlen = 0;
    if (iscsi_scsi_command_sync(iscsi, url->lun, task, NULL) == NULL) {
        fprintf(stderr, "command failed: %s\n", iscsi_get_error(iscsi));
        return 1;
    }
    if (task->status == SCSI_STATUS_CHECK_CONDITION) {
        printf("status=%d sense=%x/%02x/%02x\n", task->status, task->sense.key, (task->sense.ascq >> 8) & 0xff,
               task->sense.ascq & 0xff);
    } else {
        printf("status=%d\n", task->status);
    }
    scsi_free_scsi_task(task);
    iscsi_logout_sync(iscsi);
    iscsi_destroy_url(url);
    iscsi_destroy_context(iscsi);
    return 0;
}
